"""`corral top` against a real stack: its frames show the figures moving while traffic flows, and `q` typed
at its terminal (a pseudo-terminal here) ends it."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import anyio
import pytest

from contracts import TaskSpec
from services.client import Client
from contracts.policy import Defaults, Policy, RateLimit
from tests.conftest import operator_env, services, stack, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ROOMY = Policy(defaults=Defaults(tenant_rate=RateLimit(requests_per_minute=60_000, tokens_per_minute=10**8,
                                                       burst_requests=10_000, burst_tokens=10**7)))
"""Traffic runs until the view shows it, however long a loaded machine takes: the tenant's rate never binds."""


async def _top_once(settings) -> str:
    done = await anyio.run_process([sys.executable, "-m", "services.cli", "top", "--once", "--nats", settings.nats_url],
                                   check=False, env={**os.environ, **operator_env(settings), "COLUMNS": "160"})
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    return out


def figure(frame: str, name: str) -> list[float]:
    """The numbers on the frame's row that starts with `name`."""
    row = next(line for line in frame.splitlines() if name in line)
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\.?\d*", row.split(name, 1)[1])]


async def _traffic(client, tenant, user, count: int) -> None:
    """COUNT tasks to their end, each for a user of its own (a user's rate limit would turn some away)."""
    async with anyio.create_task_group() as tg:
        for n in range(count):
            spec = TaskSpec(agent="research", prompt=f"question {n}")
            tg.start_soon(partial(client.run, spec, tenant=tenant, user=f"{user}-{uuid.uuid4().hex[:6]}"))


async def test_corral_top_once_shows_tasks_throughput_tokens_and_cost_rise_while_traffic_flows(settings, tenant, user):
    async with stack(settings, policy=ROOMY) as client:
        before = await _top_once(settings)
        assert figure(before, "tasks done / failed") == [0, 0]
        assert "Corral top" in before and "queue" in before and "breaker" in before
        enough = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_traffic_in_waves, client, tenant, user, enough)
            during = await wait_until(lambda: _moving(settings), timeout=60)
            enough.set()
        ended = figure(during, "tasks done / failed")[0]
        await _traffic(client, tenant, user, 5)
        after = await wait_until(lambda: _done_at_least(settings, ended + 5), timeout=30)
    assert figure(during, "throughput (tasks/s)")[0] > 0
    assert ended > 0
    assert figure(after, "tokens per hour")[0] > 0
    assert figure(after, "cost per task")[0] > 0
    assert "executor-tasks" in after  # a queue the monitor polls


async def _traffic_in_waves(client, tenant, user, enough: anyio.Event) -> None:
    """Tasks keep coming until the test has the frame it waits for."""
    while not enough.is_set():
        await _traffic(client, tenant, user, 5)


async def _moving(settings) -> str | None:
    frame = await _top_once(settings)
    return frame if figure(frame, "throughput (tasks/s)")[0] > 0 else None


async def _done_at_least(settings, tasks: float) -> str | None:
    frame = await _top_once(settings)
    return frame if figure(frame, "tasks done / failed")[0] >= tasks else None


def _read_until(fd: int, words: bytes, timeout: float) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while words not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{words!r} never appeared; the terminal showed {seen[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the other end closed: the program exited
                break
    assert words in seen, f"the program exited before {words!r} appeared; it showed {seen[-2000:]!r}"
    return seen


@contextmanager
def top_at_a_terminal(settings) -> Iterator[tuple[int, subprocess.Popen]]:
    """`corral top` with a pseudo-terminal for its stdin and stdout; the terminal's other end."""
    controller, terminal = pty.openpty()
    env = {**os.environ, **operator_env(settings), "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "50"}
    top = subprocess.Popen([sys.executable, "-m", "services.cli", "top", "--nats", settings.nats_url],
                           stdin=terminal, stdout=terminal, stderr=terminal, env=env, start_new_session=True)
    os.close(terminal)
    try:
        yield controller, top
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        os.close(controller)


async def test_corral_top_redraws_at_its_terminal_and_quits_when_q_is_typed(settings):
    async with stack(settings, "monitor"):
        with top_at_a_terminal(settings) as (controller, top):
            first = await anyio.to_thread.run_sync(_read_until, controller, b"Corral top", 30.0)
            redrawn = await anyio.to_thread.run_sync(_read_until, controller, b"Corral top", 30.0)
            os.write(controller, b"q")
            code = await anyio.to_thread.run_sync(top.wait, 30.0)
    assert b"q quits" in first + redrawn
    assert code == 0


async def test_corral_top_keeps_its_last_frame_and_says_so_while_the_monitor_is_gone(settings, tmp_path):
    stack_ = services(settings, tmp_path / "logs")
    monitor = stack_.start_one("monitor")
    try:
        async with Client.connect(settings, "test") as client:
            await client.wait_ready({"corral-monitor"}, timeout=90)
        with top_at_a_terminal(settings) as (controller, top):
            await anyio.to_thread.run_sync(_read_until, controller, b"Corral top", 30.0)
            monitor.kill()
            said = await anyio.to_thread.run_sync(_read_until, controller, b"did not answer", 60.0)
            os.write(controller, b"q")
            code = await anyio.to_thread.run_sync(top.wait, 30.0)
    finally:
        stack_.stop()
    assert b"Corral top" in said  # the last frame, still there
    assert code == 0


async def test_corral_top_says_no_monitor_answers_when_none_runs_and_exits_3(settings):
    done = await anyio.run_process([sys.executable, "-m", "services.cli", "top", "--once", "--nats", settings.nats_url],
                                   check=False, env={**os.environ, **operator_env(settings), "COLUMNS": "160"})
    assert done.returncode == 3
    assert "no monitor answers" in done.stdout.decode()
