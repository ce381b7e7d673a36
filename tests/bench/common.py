"""What both runs share: the publish/collect loop, percentiles, and process sampling.

A run publishes ids with a bounded number of publishes in flight and collects
arrivals (a terminal event, or a message out of the last hop) until every id has
arrived or nothing has arrived for `idle_timeout_s` after the last publish.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import msgspec
import psutil

# Bench processes never read the caller's config file or export traces: each run is
# isolated and only talks to 127.0.0.1.
ISOLATED_ENV = {"CORRAL_CONFIG": "", "CORRAL_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
Publish = Callable[[str], Awaitable[None]]
MB = 1024 * 1024
LOST_SAMPLE = 10
WARMUP_IDLE_S = 5.0  # a warm-up that loses a task should not hold the run up for long


class RunResult(msgspec.Struct):
    """One measured run: counts, wall time and end-to-end latencies."""

    sent: int
    arrived: int
    publish_errors: int
    elapsed_s: float
    per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    outcomes: dict[str, int] = {}
    lost_sample: list[str] = []  # a few ids that never arrived, to look up

    @property
    def lost(self) -> int:
        return self.sent - self.arrived


class ProcessStats(msgspec.Struct):
    peak_rss_mb: float
    cpu_s: float


class Measured(msgspec.Struct):
    """A run with what its processes cost; `lost_status` explains a few lost ids."""

    result: RunResult
    processes: dict[str, ProcessStats]
    other_cpu_s: float  # used by processes not ours during the run
    server_msgs: int  # through the nats-server during the run, in + out
    crashed: list[str]
    kv_writes: dict[str, int] = {}  # per KV bucket during the run: where the pipeline's writes go
    late_steps: int | None = None  # steps the budget posted after their task's release had begun
    lost_status: dict[str, str] = {}


class Tracker:
    """Publish times per id and arrival latencies; the first publish starts the clock."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.latencies_ms: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.publish_errors = 0
        self.started = 0.0
        self.last_arrival = 0.0
        self.last_publish = 0.0
        self.publishing = True

    def published(self, key: str) -> None:
        now = time.perf_counter()
        self.started = self.started or now
        self.sent[key] = now

    def arrived(self, key: str, outcome: str) -> bool:
        """Record an arrival; False for ids not ours (or seen already)."""
        start = self.sent.pop(key, None)
        if start is None:
            return False
        self.last_arrival = time.perf_counter()
        self.latencies_ms.append((self.last_arrival - start) * 1000)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        return True

    def result(self, total: int) -> RunResult:
        arrived = len(self.latencies_ms)
        elapsed = max(self.last_arrival - self.started, 1e-9) if arrived else 0.0
        p = percentiles(self.latencies_ms)
        return RunResult(sent=total, arrived=arrived, publish_errors=self.publish_errors, elapsed_s=elapsed,
                         per_s=arrived / elapsed if arrived else 0.0, p50_ms=p[0], p95_ms=p[1], p99_ms=p[2],
                         outcomes=dict(self.outcomes), lost_sample=list(self.sent)[:LOST_SAMPLE])


def percentiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """Nearest-rank p50, p95, p99 (0 when there are no samples)."""
    if not samples:
        return 0.0, 0.0, 0.0
    ordered = sorted(samples)
    return tuple(ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.50, 0.95, 0.99))


Receive = Callable[[], Awaitable[tuple[str, str] | None]]


async def drive(ids: Sequence[str], publish: Publish, receive: Receive, concurrency: int,
                idle_timeout_s: float) -> RunResult:
    """Publish every id (at most `concurrency` in flight) while collecting arrivals.

    `receive()` returns (id, outcome) for an arrival, None for anything else.
    """
    tracker = Tracker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_publish_all, ids, publish, concurrency, tracker)
        await _collect(receive, tracker, len(ids), idle_timeout_s)
        tg.cancel_scope.cancel()  # stragglers' publishes, if we gave up on them
    return tracker.result(len(ids))


async def _publish_all(ids: Iterable[str], publish: Publish, concurrency: int, tracker: Tracker) -> None:
    queue = iter(ids)

    async def publisher() -> None:  # `concurrency` of these: each has one publish in flight
        for key in queue:
            tracker.published(key)
            try:
                await publish(key)
            except Exception:  # counted; its id never arrives, so it is reported lost
                tracker.publish_errors += 1
            tracker.last_publish = time.perf_counter()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(publisher)
    tracker.publishing = False


async def _collect(receive: Receive, tracker: Tracker, total: int, idle_timeout_s: float) -> None:
    arrived = 0
    while arrived < total:
        last_activity = max(tracker.last_arrival, tracker.last_publish)
        if not tracker.publishing and time.perf_counter() - last_activity > idle_timeout_s:
            return  # the rest is lost
        with anyio.move_on_after(0.5):
            got = await receive()
            if got and tracker.arrived(*got):
                arrived += 1


class ProcessSampler:
    """Per named process, while `run()` runs: peak RSS and CPU seconds; and the CPU the
    rest of the machine used meanwhile (anything else running skews the numbers)."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.1) -> None:
        self.every_s = every_s
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak_rss: dict[str, int] = dict.fromkeys(pids, 0)
        self._start = {name: _cpu(proc) for name, proc in self.procs.items()}
        self._last = dict(self._start)
        self._machine_start = self._machine_last = _machine_busy()

    def sample(self) -> None:
        self._machine_last = _machine_busy()
        for name, proc in self.procs.items():
            try:
                self.peak_rss[name] = max(self.peak_rss[name], proc.memory_info().rss)
                self._last[name] = _cpu(proc)
            except psutil.Error:
                pass  # exited: keep what we saw

    async def run(self) -> None:
        while True:
            self.sample()
            await anyio.sleep(self.every_s)

    def stats(self) -> dict[str, ProcessStats]:
        return {name: ProcessStats(peak_rss_mb=round(self.peak_rss[name] / MB, 1),
                                   cpu_s=round(self._last[name] - self._start[name], 2)) for name in self.procs}

    def other_cpu_s(self) -> float:
        ours = sum(self._last[name] - self._start[name] for name in self.procs)
        return round(max(0.0, self._machine_last - self._machine_start - ours), 2)


def _machine_busy() -> float:
    """CPU seconds all cores spent not idle."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds (user + system) so far."""
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


async def sampled(pids: dict[str, int], suffix: str, measure: Callable[[], Awaitable[RunResult]],
                  ) -> tuple[RunResult, ProcessSampler, int]:
    """Run `measure()` while sampling `pids`, the nats-server and this driver process;
    also returns how many messages the server moved meanwhile (in + out, from /varz)."""
    pids = dict(pids)
    server = nats_server_pid()
    if server:
        pids[f"nats-server{suffix}"] = server
    pids[f"bench driver{suffix}"] = os.getpid()
    sampler = ProcessSampler(pids)
    before = await anyio.to_thread.run_sync(server_messages, server)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sampler.run)
        result = await measure()
        tg.cancel_scope.cancel()
    sampler.sample()
    after = await anyio.to_thread.run_sync(server_messages, server)
    return result, sampler, after - before


def server_messages(pid: int | None) -> int:
    """Messages in + out of the nats-server so far, from its monitoring port (0 if unknown)."""
    varz = _monitoring(pid, "varz") or {}
    return varz.get("in_msgs", 0) + varz.get("out_msgs", 0)


def kv_writes(pid: int | None) -> dict[str, int]:
    """Writes so far to each KV bucket (its stream's last sequence), from the monitoring port."""
    jsz = _monitoring(pid, "jsz?streams=true") or {}
    return {stream["name"].removeprefix("KV_"): stream["state"]["last_seq"]
            for account in jsz.get("account_details", []) for stream in account.get("stream_detail", [])
            if stream["name"].startswith("KV_")}


def _monitoring(pid: int | None, path: str) -> dict[str, Any] | None:
    """The nats-server's monitoring endpoint `path` (None if unknown)."""
    try:
        argv = psutil.Process(pid).cmdline() if pid else []
        port = int(argv[argv.index("--http_port") + 1])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        with opener.open(f"http://127.0.0.1:{port}/{path}", timeout=2) as response:
            return json.load(response)
    except (psutil.Error, ValueError, IndexError, OSError):
        return None


def warm_up_failed(warm: RunResult) -> bool:
    """Nothing came through at all: a process is not running (a few lost is the pipeline's to report)."""
    return warm.arrived == 0


def nats_server_pid() -> int | None:
    """The nats-server our `nats_server()` started (a child of this process)."""
    for child in psutil.Process().children():
        try:
            if child.name() == "nats-server":
                return child.pid
        except psutil.Error:
            continue
    return None
