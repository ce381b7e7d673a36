"""Autoscaling: the monitor's advice from consumer lag and processing rate (services/monitor/scaling.py), and
`corral up --autoscale` acting on it with real processes: a backlog raises the worker count,
and it falls back once the backlog is gone and the scale-down delay has passed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import msgspec
import pytest

from contracts import TaskCompleted, TaskSpec
from contracts.events import ScaleAdvice
from contracts.policy import Policy, ScaleBounds, Scaling
from services import auth
from services.autoscale import LOCAL_MAX, Autoscaler, process_args
from services.client import Client
from services.monitor.scaling import Backlog, Scaler, service_of
from shared.config import Settings
from tests.conftest import Clock, apply, wait_until

SCALING = Scaling(lag_per_replica=10, rate_per_replica=5.0, scale_down_delay_s=30.0,
                  services={"worker-research": ScaleBounds(min_replicas=1, max_replicas=3)})


def _research(lag: int, acked: int = 0) -> list[Backlog]:
    return [Backlog(durable="worker-research", pending=lag, ack_pending=0, acked=acked)]


def test_a_service_is_advised_one_replica_per_lag_threshold_of_its_busiest_consumer_within_its_bounds():
    scaler = Scaler(clock=Clock(0.0))
    assert scaler.advise(_research(0), SCALING)[0].replicas == 1  # its minimum
    assert scaler.advise(_research(25), SCALING)[0].replicas == 3
    assert scaler.advise(_research(500), SCALING)[0].replicas == 3  # its maximum
    executor = scaler.advise([Backlog(durable="executor-tasks", pending=15, ack_pending=10, acked=0),
                              Backlog(durable="executor-steps", pending=10, ack_pending=0, acked=0)], SCALING)
    assert [(a.service, a.lag, a.replicas) for a in executor] == [("executor", 35, 3)]  # its busiest: 25 of 35
    flood = scaler.advise([Backlog(durable="executor-tasks", pending=900, ack_pending=0, acked=0)], SCALING)
    assert flood[0].replicas == 4  # the default bounds: 1..4


def test_the_processing_rate_keeps_replicas_that_keep_up_with_traffic_even_with_no_lag():
    clock = Clock(0.0)
    scaler = Scaler(clock=clock)
    scaler.advise(_research(0, acked=100), SCALING)
    clock.now = 2.0
    advice = scaler.advise(_research(0, acked=120), SCALING)[0]  # 10 messages a second acknowledged
    assert advice.processing_rate == 10.0 and advice.replicas == 2


def test_advice_goes_up_at_once_and_down_only_after_the_scale_down_delay():
    clock = Clock(0.0)
    scaler = Scaler(clock=clock)
    assert scaler.advise(_research(30), SCALING)[0].replicas == 3
    clock.now = 29.0
    held = scaler.advise(_research(0), SCALING)[0]
    assert held.replicas == 3 and "scale-down delay" in held.reason
    clock.now = 30.0
    assert scaler.advise(_research(0), SCALING)[0].replicas == 1


def test_consumers_of_no_service_and_the_monitor_are_not_scaled():
    assert service_of("budget-usage") == "budget" and service_of("worker-coding") == "worker-coding"
    assert service_of("someone-elses") is None
    assert process_args("monitor") is None and process_args("worker-") is None
    assert process_args("worker-research") == ("worker", "research") and process_args("executor") == ("executor", None)


def test_the_local_scaler_ignores_advice_that_does_not_decode_and_caps_what_it_believes(tmp_path):
    scaler = Autoscaler(services=None)
    scaler.on_advice(b"{not json")
    scaler.on_advice(b'{"kind": "scale.advice", "service": "../../bin", "replicas": 2}')
    forged = ScaleAdvice(service="worker-research", replicas=1000, minimum=1, maximum=1000, lag=10**9)
    scaler.on_advice(msgspec.json.encode(forged))
    scaler.on_advice(msgspec.json.encode(msgspec.structs.replace(forged, service="monitor")))
    assert scaler.wanted == {"worker-research": LOCAL_MAX}


BACKLOG = 40


@asynccontextmanager
async def corral_up_autoscaling(data_dir: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """`corral up --autoscale` with its own embedded server; its URL and the lines it prints (as they come)."""
    env = {**os.environ, "CORRAL_SIM_LATENCY_S": "1.0", "CORRAL_CONCURRENCY": "2", "COLUMNS": "200"}
    env.pop("CORRAL_NATS_CREDENTIALS", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--autoscale", "--data-dir", str(data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode().rstrip() for line in proc.stdout),
                              daemon=True)
    reader.start()
    try:
        yield await wait_until(partial(_printed_url, lines, proc), 60), lines
    finally:
        proc.terminate()  # `corral up` stops its services on SIGTERM, as on Ctrl-C
        proc.wait(60)
        reader.join(10)


async def _printed_url(lines: list[str], proc: subprocess.Popen) -> str | None:
    assert proc.poll() is None, "\n".join(lines)
    return next((line.split(" on ")[1].split(";")[0] for line in list(lines) if "Corral is up on" in line), None)


@pytest.mark.anyio
@pytest.mark.integration
async def test_corral_up_autoscale_raises_the_worker_count_under_a_backlog_and_lowers_it_after_the_delay(
        tenant, tmp_path):
    scaling = Scaling(lag_per_replica=4, scale_down_delay_s=5.0, default=ScaleBounds(min_replicas=1, max_replicas=1),
                      services={"worker-research": ScaleBounds(min_replicas=1, max_replicas=3)})
    counts: list[int] = []
    async with corral_up_autoscaling(tmp_path / "data") as (url, printed):
        operator = auth.signed_in(Settings(nats_url=url), auth.auth_dir(tmp_path / "data"))
        await apply(operator, Policy(scaling=scaling))
        async with Client.connect(operator, "test") as client:
            await client.wait_ready({"corral-monitor", "corral-worker-research", "corral-executor"}, timeout=60)
            ends = await _backlog(client, tenant, BACKLOG, counts)
            await wait_until(lambda: _workers_are(client, 1, counts), timeout=60)
    assert all(isinstance(end, TaskCompleted) for end in ends) and len(ends) == BACKLOG
    assert max(counts) >= 2, counts  # it rose
    assert counts[-1] == 1  # and fell
    said = "\n".join(printed)
    assert "autoscale: started worker-research" in said and "autoscale: stopped worker-research" in said, said


async def _backlog(client: Client, tenant: str, count: int, counts: list[int]) -> list:
    """COUNT tasks at once, run to their ends while the worker count is watched until it has risen."""
    ends = []

    async def one(n: int) -> None:
        spec = TaskSpec(agent="research", prompt=f"backlog {n}")
        ends.append(await client.run(spec, tenant=tenant, user=f"u-{uuid.uuid4().hex[:8]}", timeout=120))

    async with anyio.create_task_group() as tg:
        for n in range(count):
            tg.start_soon(one, n)
        await wait_until(partial(_workers_at_least, client, 2, counts), timeout=90)
    return ends


async def _workers(client: Client, counts: list[int]) -> int:
    """Worker replicas answering pings now."""
    counts.append((await client.running_services())["corral-worker-research"])
    return counts[-1]


async def _workers_at_least(client: Client, n: int, counts: list[int]) -> bool:
    return await _workers(client, counts) >= n


async def _workers_are(client: Client, n: int, counts: list[int]) -> bool:
    return await _workers(client, counts) == n
