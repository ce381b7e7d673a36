"""Breaker benchmark: `python -m tests.bench.breakers`. It reports; it never asserts.

Every service runs as its own OS process, on an embedded nats-server at 127.0.0.1,
with three executor replicas and the SIMULATED model (zero latency unless --latency).

1. Trip propagation. `simulated/sim-large` is made to fail (`corral sim fail`) and
   research tasks are sent until its breaker opens; measured is the time from the end of
   the call that tripped it (BreakerChanged.cause_at) to the moment the last of the three
   executor replicas saw it open (each replica's `$SRV.STATS` says when its view changed).
   Then the model recovers, a probe closes the circuit, and the cycle repeats (--trips).
2. Healthy throughput. A burst of --tasks tasks, a third research (they need the tool
   `search`), a third coding, a third writing; once with nothing down, once with
   `tool/search` failing. Reported: completions per second of the coding and writing
   tasks (the healthy agents) in each run, and what happened to the research tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from contracts import BreakerChanged, TaskCompleted, TaskFailed, TaskRejected, TaskSpec
from contracts.commands import SimulateDependency
from contracts.policy import AgentPolicy, BreakerSettings, Strategy
from services.client import Client
from services.monitor.handlers import percentiles
from services.stack import Services, nats_server
from shared.config import Settings
from shared.policy import apply_policy
from tests.signals import example_policy, replica_views, signals

LARGE = "simulated/sim-large"
SEARCH = "tool/search"
EXECUTORS = 3
AGENTS = ("research", "coding", "writing")
ISOLATED_ENV = {"CORRAL_CONFIG": "", "CORRAL_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
PROBE_EVERY_S = 0.2
USERS = 50  # budgets and rate limits are per user: spread the load as real traffic would


class Throughput(msgspec.Struct):
    down: str
    tasks: int
    healthy: int
    healthy_completed: int
    healthy_per_s: float
    research: dict[str, int]


class Report(msgspec.Struct):
    trips: int
    propagation_ms: list[float]
    p50_ms: float
    p99_ms: float
    max_ms: float
    throughput: list[Throughput]
    cores: int
    elapsed_s: float


def bench_policy():
    research = AgentPolicy(chain=[Strategy(model="sim-large", tier="advanced", max_attempts=1, timeout_s=10),
                                  Strategy(model="sim-small", tier="fast", timeout_s=10)])
    trips_fast = BreakerSettings(window_size=5, minimum_calls=5, wait_in_open_s=0.5)
    policy = example_policy()
    return msgspec.structs.replace(policy, agents={**policy.agents, "research": research},
                                   breaker_overrides={LARGE: trips_fast, SEARCH: BreakerSettings()})


async def trip_propagation(client: Client, trips: int) -> list[float]:
    """Milliseconds from the tripping call's end to the last executor replica's view showing the circuit open."""
    lags = []
    async with signals(client) as heard:
        for trip in range(trips):
            opened_generation = 3 * trip + 1  # each cycle: open, half_open, closed
            await client.simulate(SimulateDependency(dependency=LARGE, mode="fail"), expect=1)
            for n in range(6):  # five failures in the window open it
                await client.submit(TaskSpec(agent="research", prompt=f"trip {trip} #{n}"), tenant="acme",
                                    user="bench")
            opened = await heard.first(BreakerChanged, dependency=LARGE, generation=opened_generation)

            async def all_see_it():
                views = await replica_views(client, "corral-executor", LARGE)
                fresh = [v for v in views if v.get("state") == "open" and v["seen_at"] >= opened.cause_at - 1e-3]
                return fresh if len(fresh) == EXECUTORS else None

            views = await _wait(all_see_it)
            lags.append((max(view["seen_at"] for view in views) - opened.cause_at) * 1000)
            await client.simulate(SimulateDependency(dependency=LARGE, mode="recover"), expect=1)
            with anyio.fail_after(30):
                while not heard.of(BreakerChanged, dependency=LARGE, generation=opened_generation + 2):
                    await client.submit(TaskSpec(agent="research", prompt=f"probe {trip}"), tenant="acme",
                                        user="bench")
                    await anyio.sleep(PROBE_EVERY_S)  # pacing the probe traffic, not a sync point
    return lags


async def healthy_throughput(client: Client, tasks: int, down: str | None) -> Throughput:
    if down:
        await client.simulate(SimulateDependency(dependency=down, mode="fail"), expect=len(AGENTS))
    healthy: set[str] = set()
    ends: dict[str, object] = {}
    async with client.events() as events:
        started = time.time()
        ids: set[str] = set()
        for n in range(tasks):
            agent = AGENTS[n % 3]
            spec = TaskSpec(agent=agent, prompt=f"work item {n}", tools=["search"] if agent == "research" else [])
            task_id = await client.submit(spec, tenant="acme", user=f"bench{n % USERS}")
            ids.add(task_id)
            if agent != "research":
                healthy.add(task_id)
        with anyio.move_on_after(120):
            async for event in events:
                if event.task_id in ids:
                    if isinstance(event, (TaskCompleted, TaskFailed, TaskRejected)):
                        ends[event.task_id] = event
                        if len(ends) == len(ids):
                            break
    if down:
        await client.simulate(SimulateDependency(dependency=down, mode="recover"), expect=len(AGENTS))
    done = [e for i, e in ends.items() if i in healthy and isinstance(e, TaskCompleted)]
    last = max((e.occurred_at.timestamp() for e in done), default=started)
    research = Counter(_outcome(e) for i, e in ends.items() if i not in healthy)
    return Throughput(down=down or "nothing", tasks=tasks, healthy=len(healthy), healthy_completed=len(done),
                      healthy_per_s=len(done) / max(last - started, 1e-9), research=dict(research))


def _outcome(event) -> str:
    if isinstance(event, TaskCompleted):
        return "completed"
    return f"failed: {event.reason}" if isinstance(event, TaskFailed) else f"rejected: {event.reason}"


async def _wait(probe, timeout: float = 10.0):
    with anyio.fail_after(timeout):
        while not (result := await probe()):
            await anyio.sleep(0.02)
    return result


async def run(trips: int, tasks: int, latency_s: float, data_dir: Path) -> Report:
    started = time.monotonic()
    with nats_server(data_dir) as url:
        services = Services(url, data_dir / "logs", env={**ISOLATED_ENV, "CORRAL_SIM_LATENCY_S": str(latency_s)},
                            agents=())
        for name in ("guard", "budget", "breaker", *["executor"] * EXECUTORS):
            services.start_one(name)
        for agent in AGENTS:
            services.start_one("worker", agent=agent)
        try:
            async with Client.connect(Settings(nats_url=url), "bench") as client:
                await apply_policy(await client.bus.policy_bucket(), bench_policy())
                await client.wait_ready(services.names(), timeout=60)
                await _wait(lambda: _replicas(client), timeout=60)
                await healthy_throughput(client, min(tasks, 60), None)  # warm-up: not reported
                lags = await trip_propagation(client, trips)
                throughput = [await healthy_throughput(client, tasks, None),
                              await healthy_throughput(client, tasks, SEARCH)]
        finally:
            services.stop()
    spread = percentiles(lags)
    return Report(trips=len(lags), propagation_ms=[round(lag, 2) for lag in lags], p50_ms=round(spread.p50_ms, 2),
                  p99_ms=round(spread.p99_ms, 2), max_ms=round(max(lags, default=0.0), 2), throughput=throughput,
                  cores=os.cpu_count() or 0, elapsed_s=round(time.monotonic() - started, 1))


async def _replicas(client: Client) -> bool:
    return (await client.running_services()).get("corral-executor", 0) >= EXECUTORS


def print_report(report: Report, out: Console) -> None:
    table = Table(title=f"Breakers (SIMULATED model, {EXECUTORS} executor replicas, {report.cores} cores)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row(f"trip -> last replica sees it open, p50 / p99 ({report.trips} trips)",
                  f"{report.p50_ms:.1f} / {report.p99_ms:.1f} ms")
    table.add_row("  slowest trip", f"{report.max_ms:.1f} ms")
    for run_ in report.throughput:
        table.add_row(f"healthy agents (coding, writing), {run_.down} down",
                      f"{run_.healthy_per_s:.0f} tasks/s ({run_.healthy_completed}/{run_.healthy} completed)")
        table.add_row(f"  research tasks (need {SEARCH}), {run_.down} down",
                      ", ".join(f"{k} {v}" for k, v in sorted(run_.research.items())))
    base, down = report.throughput
    ratio = down.healthy_per_s / base.healthy_per_s
    table.add_row("healthy throughput with one dependency down / none", f"{ratio:.2f}")
    table.add_row("wall time", f"{report.elapsed_s:.0f} s")
    out.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.breakers", description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=20, help="breaker trips to time (default 20)")
    parser.add_argument("--tasks", type=int, default=600, help="tasks per throughput run (default 600)")
    parser.add_argument("--latency", type=float, default=0.0, help="simulated model latency, seconds (default 0)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        report = anyio.run(run, args.trips, args.tasks, args.latency, Path(tmp), backend_options={"use_uvloop": True})
    print_report(report, Console())
    if args.json:
        args.json.write_text(json.dumps(msgspec.to_builtins(report), indent=2))


if __name__ == "__main__":
    sys.exit(main())
