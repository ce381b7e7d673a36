"""Monitor benchmark: `python -m tests.bench.monitor`. It reports; it never asserts.

The monitor runs as its own OS process on an embedded nats-server at 127.0.0.1; this process publishes the
events the monitor reads (TaskValidated, StepCompleted, TaskCompleted; --tenants tenants, three agent kinds,
two models) straight into the streams.

1. Steady load: --rate events per second for --seconds. Reported: the monitor's CPU time per event and its
   share of one core, its resident memory after the run, and the snapshot's size in its bucket.
2. Recovery: with the monitor stopped, a day of events goes into the streams (--day-rate tasks a second for
   24 hours: three events each, published as fast as the server takes them; the streams stamp them now).
   Then the time from the monitor's start to its first status answer that counts every event: (a) after a
   restart whose snapshot predates the day (it replays the day), (b) after a restart right after a snapshot
   (it replays nothing), (c) with the snapshot gone (it rebuilds from the streams).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import psutil
from nats.js.errors import NoKeysError
from rich.console import Console
from rich.table import Table

from contracts import StepCompleted, TaskCompleted, TaskSpec, TaskValidated, subjects
from contracts.events import TokenEstimate, Usage
from services.client import Client
from services.stack import Services, nats_server
from shared.config import Settings
from tests.bench.common import ISOLATED_ENV, MB

AGENTS = ("research", "coding", "writing")
MODELS = ("sim-large", "sim-small")
DAY_S = 24 * 3600
ENCODER = msgspec.json.Encoder()


class Report(msgspec.Struct):
    rate: int
    seconds: float
    events: int
    cpu_us_per_event: float
    cpu_share_of_a_core: float
    rss_mb: float
    start_empty_s: float
    """From the monitor's start to its first answer, with nothing to replay: the floor of the three below."""
    snapshot_kb: float
    day_events: int
    publish_day_s: float
    replay_day_s: float
    from_fresh_snapshot_s: float
    rebuild_without_snapshot_s: float
    rss_after_day_mb: float
    cores: int
    date: str


def task_events(n: int, tenants: int) -> list[tuple[str, bytes]]:
    """The three events of task `n`, as the guard, a worker and the executor publish them."""
    tenant, agent, model = f"tenant-{n % tenants}", AGENTS[n % 3], MODELS[n % 2]
    task_id, received = f"bench-{n}", datetime.now(UTC)
    usage = Usage(input_tokens=40, output_tokens=20)
    return [
        (subjects.task_validated(tenant), ENCODER.encode(TaskValidated(
            task_id=task_id, tenant=tenant, user="u", spec=TaskSpec(agent=agent, prompt="p"),
            estimate=TokenEstimate(prompt_tokens=40, max_output_tokens=20), received_at=received))),
        (subjects.step_completed(tenant), ENCODER.encode(StepCompleted(
            task_id=task_id, tenant=tenant, user="u", step_id=f"{task_id}-1", attempt=1, agent=agent,
            dependency=f"simulated/{model}", model=model, output="o", usage=usage, latency_ms=12.0))),
        (subjects.task_completed(tenant), ENCODER.encode(TaskCompleted(
            task_id=task_id, tenant=tenant, user="u", output="o", usage=usage, attempts=1, model=model,
            received_at=received))),
    ]


async def steady(client: Client, rate: int, seconds: float, tenants: int, first: int) -> int:
    """Publish `rate` events a second (whole tasks of three events, paced every 5 ms) for `seconds`; returns
    the tasks sent."""
    sent, started = 0, time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate / 3)
        for n in range(first + sent, first + due):
            for subject, data in task_events(n, tenants):
                await client.bus.nc.publish(subject, data)
        sent = max(sent, due)
        await client.bus.nc.flush()
        await anyio.sleep(0.005)
    return sent


async def flood(client: Client, tasks: int, tenants: int, first: int) -> None:
    for n in range(first, first + tasks):
        for subject, data in task_events(n, tenants):
            await client.bus.nc.publish(subject, data)
        if n % 200 == 0:
            await client.bus.nc.flush()
    await client.bus.nc.flush()


async def counted(client: Client, tasks: int, timeout: float = 600.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                if (await client.status(timeout=2)).counts.get("task.completed", 0) >= tasks:
                    return
            except Exception:  # noqa: BLE001 - not answering yet (replaying)
                pass
            await anyio.sleep(0.05)


async def restart(client: Client, services: Services, tasks: int) -> tuple[float, psutil.Process]:
    """Start the monitor; seconds until it answers with all `tasks` counted."""
    started = time.monotonic()
    proc = services.start_one("monitor")
    await counted(client, tasks)
    return time.monotonic() - started, psutil.Process(proc.pid)


def stop_monitor(services: Services) -> None:
    for proc in services.processes:
        proc.stop(timeout=60)
    services.processes.clear()


async def snapshot_bytes(client: Client) -> int:
    kv = await client.bus.bucket(subjects.KV_MONITOR)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return 0
    return sum([len((await kv.get(key)).value or b"") for key in keys])


async def run(rate: int, seconds: float, tenants: int, day_rate: float, data_dir: Path) -> Report:
    with nats_server(data_dir) as url:
        services = Services(url, data_dir / "logs", env={**ISOLATED_ENV, "CORRAL_MONITOR_SNAPSHOT_S": "5"}, agents=())
        async with Client.connect(Settings(nats_url=url), "bench") as client:
            try:
                empty_s, proc = await restart(client, services, 0)
                await client.wait_ready({"corral-monitor"}, timeout=60)
                before = proc.cpu_times()
                began = time.monotonic()
                sent = await steady(client, rate, seconds, tenants, 0)
                await counted(client, sent)
                elapsed = time.monotonic() - began
                after = proc.cpu_times()
                cpu = (after.user + after.system) - (before.user + before.system)
                rss = proc.memory_info().rss
                stop_monitor(services)
                snapshot = await snapshot_bytes(client)
                day = int(day_rate * DAY_S)
                published = time.monotonic()
                await flood(client, day, tenants, sent)
                publish_s = time.monotonic() - published
                replay_s, proc = await restart(client, services, sent + day)
                rss_day = proc.memory_info().rss
                stop_monitor(services)
                fresh_s, _ = await restart(client, services, sent + day)
                stop_monitor(services)
                await (await client.bus.bucket(subjects.KV_MONITOR)).purge("head")
                rebuild_s, _ = await restart(client, services, sent + day)
            finally:
                stop_monitor(services)
    events = sent * 3
    return Report(rate=rate, seconds=round(elapsed, 1), events=events,
                  cpu_us_per_event=round(cpu / events * 1e6, 1), cpu_share_of_a_core=round(cpu / elapsed, 3),
                  rss_mb=round(rss / MB, 1), start_empty_s=round(empty_s, 2), snapshot_kb=round(snapshot / 1024, 1),
                  day_events=day * 3,
                  publish_day_s=round(publish_s, 1), replay_day_s=round(replay_s, 1),
                  from_fresh_snapshot_s=round(fresh_s, 2), rebuild_without_snapshot_s=round(rebuild_s, 1),
                  rss_after_day_mb=round(rss_day / MB, 1), cores=os.cpu_count() or 0,
                  date=datetime.now(UTC).strftime("%Y-%m-%d"))


def show(report: Report, console: Console) -> None:
    table = Table(title="Monitor")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in msgspec.structs.asdict(report).items():
        table.add_row(name, str(value))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.monitor", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="events per second in the steady run")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--day-rate", type=float, default=1.0, help="tasks per second over the generated day")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-monitor-") as tmp:
        report = anyio.run(run, args.rate, args.seconds, args.tenants, args.day_rate, Path(tmp))
    show(report, Console())
    out = Path(__file__).resolve().parents[2] / ".data" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor.json").write_text(json.dumps(msgspec.to_builtins(report), indent=2))


if __name__ == "__main__":
    main()
