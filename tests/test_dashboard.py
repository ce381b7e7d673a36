"""`corral dashboard` against a real stack, read by headless Chromium: the page loads with no console errors,
its numbers move while traffic flows, the task lookup finds a task; and the server answers malformed,
oversized or forged requests with the reason, and keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import pytest

from contracts import TaskCompleted, TaskSpec
from tests.browser import browser, chromium_binary
from tests.conftest import operator_env, stack, wait_until
from tests.test_top import ROOMY

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def dashboard(settings) -> AsyncIterator[tuple[str, subprocess.Popen]]:
    """`corral dashboard` on a free port; its URL once it serves (its line read in a thread: the stack it asks
    runs in this event loop)."""
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "dashboard", "--port", "0", "--nats",
                             settings.nats_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **operator_env(settings), "COLUMNS": "200"}, start_new_session=True)
    try:
        line = (await anyio.to_thread.run_sync(proc.stdout.readline)).decode()
        assert line.startswith("dashboard at "), line + proc.stdout.read().decode()
        yield line.removeprefix("dashboard at ").strip(), proc
    finally:
        proc.terminate()
        proc.wait(15)


async def _traffic(client, tenant: str, count: int) -> list:
    ends = []

    async def one(n: int) -> None:
        spec = TaskSpec(agent="research", prompt=f"dashboard question {n}")
        ends.append(await client.run(spec, tenant=tenant, user=f"u-{uuid.uuid4().hex[:8]}"))

    async with anyio.create_task_group() as tg:
        for n in range(count):
            tg.start_soon(one, n)
    return ends


async def _waves(client, tenant: str, enough: anyio.Event) -> None:
    while not enough.is_set():
        await _traffic(client, tenant, 5)


def _number(text: str) -> float:
    return float(text.replace(",", "").replace("$", "").replace("%", "").strip() or "nan")


async def test_the_dashboard_page_loads_without_console_errors_and_its_numbers_move_with_traffic(
        settings, tenant, tmp_path):
    assert chromium_binary(), "chromium is missing: `make test` installs Debian's package"
    async with stack(settings, policy=ROOMY) as client:
        first = await _traffic(client, tenant, 3)
        async with dashboard(settings) as (url, _):
            async with browser(tmp_path) as page:
                await page.call("Page.navigate", url=url)
                await page.loaded.wait()
                shown = partial(page.evaluate, "document.getElementById('tasks-done').textContent")
                before = _number(await wait_until(lambda: _a_number(shown), timeout=90))  # the monitor replays first
                enough = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_waves, client, tenant, enough)
                    rate = partial(page.evaluate, "document.getElementById('tasks-per-s').textContent")
                    await wait_until(lambda: _above(rate, 0), timeout=60)
                    await wait_until(lambda: _above(shown, before), timeout=60)
                    enough.set()
                points = await page.evaluate("document.querySelectorAll('.charts canvas').length")
                queues = await page.evaluate("document.querySelector('#queues').textContent")
                found = await _look_up(page, first[0].task_id, tenant)
                picture = await page.screenshot(tmp_path / "dashboard.png")
                errors = list(page.errors)
    assert isinstance(first[0], TaskCompleted)
    assert errors == []
    assert points == 4
    assert "executor-tasks" in queues
    assert found["found"] is True and found["task_id"] == first[0].task_id
    assert picture.stat().st_size > 10_000
    if os.environ.get("CORRAL_DASHBOARD_SCREENSHOT"):  # to refresh the picture in docs/
        shutil.copy(picture, os.environ["CORRAL_DASHBOARD_SCREENSHOT"])


async def _a_number(read) -> str | None:
    text = await read()
    return text if text and text[0].isdigit() else None


async def _above(read, floor: float) -> bool:
    text = await read()
    return bool(text and text[0].isdigit() and _number(text) > floor)


async def _look_up(page, task_id: str, tenant: str) -> dict:
    await page.evaluate(f"document.getElementById('task-id').value = {json.dumps(task_id)};"
                        f"document.getElementById('task-tenant').value = {json.dumps(tenant)};"
                        "document.querySelector('#lookup button').click()")
    result = partial(page.evaluate, "document.getElementById('task-result').textContent")
    return json.loads(await wait_until(result, timeout=30))


async def _ask(url: str, raw: bytes) -> tuple[int, bytes]:
    """Send RAW to the dashboard at URL as it is; its status code and body."""
    host, port = url.removeprefix("http://").strip("/").split(":")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(raw)
        reply = b""
        try:
            while chunk := await stream.receive():
                reply += chunk
        except anyio.EndOfStream:
            pass
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_the_dashboard_refuses_malformed_oversized_and_forged_requests_with_a_reason_and_keeps_serving(
        settings):
    async with stack(settings, "monitor"):
        async with dashboard(settings) as (url, proc):
            garbage = await _ask(url, b"\x00\xffnot http at all\r\n\r\n")
            oversized = await _ask(url, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
            posted = await _ask(url, b"POST /api/now HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            escaped = await _ask(url, b"GET /static/../server.py HTTP/1.1\r\n\r\n")
            forged_id = await _ask(url, b"GET /api/task?id=../../etc&tenant=default HTTP/1.1\r\n\r\n")
            nested_tenant = await _ask(url, b"GET /api/task?id=t1&tenant=a.b.%3E HTTP/1.1\r\n\r\n")
            unknown = await _ask(url, b"GET /nothing-here HTTP/1.1\r\n\r\n")
            still = await _ask(url, b"GET /api/now HTTP/1.1\r\n\r\n")
            alive = proc.poll() is None
    assert garbage[0] == 400 and b"HTTP request line" in garbage[1]
    assert oversized[0] == 400 and b"over" in oversized[1]
    assert posted[0] == 405 and b"only GET" in posted[1]
    assert escaped[0] == 404
    assert forged_id[0] == 400 and b"task_id" in forged_id[1]
    assert nested_tenant[0] == 400 and b"tenant" in nested_tenant[1]
    assert unknown[0] == 404
    assert still[0] == 200 and "tasks_per_s" in json.loads(still[1])
    assert alive


async def test_the_dashboard_stops_cleanly_on_sigterm_while_the_monitor_has_never_answered(settings):
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "dashboard", "--port", "0", "--nats",
                             settings.nats_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **operator_env(settings)}, start_new_session=True)
    try:
        said = (await anyio.to_thread.run_sync(proc.stdout.readline)).decode()  # no monitor runs: it says so
        proc.terminate()
        code = await anyio.to_thread.run_sync(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "the monitor did not answer" in said
    assert code == 0  # its own stop, not the signal's default death
