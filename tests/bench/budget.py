"""`python -m tests.bench.budget`: how fast the budget admits, and how often its compare-and-set retries.

Three budget replicas (OS processes, as `corral service budget` runs them) on an embedded
nats-server on 127.0.0.1. The bench publishes TaskValidated events straight to the budget
(no guard, no executor) and counts its decisions (TaskAdmitted or TaskRejected) on a core
subscription, in two runs:

- contention: every admission for ONE user, so every one is a compare-and-set on the same
  two keys (the user's account and the tenant's);
- spread: the admissions spread over 10,000 users of four tenants (one user key each,
  four tenant keys shared).

Limits are set high enough that every task is admitted. Conflicts are the CAS retries the
replicas report in `$SRV.STATS` (TypedBucket.conflicts), per admission. It reports and
asserts nothing; every wait is bounded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import msgspec
from nats.aio.msg import Msg
from rich.console import Console
from rich.table import Table

from contracts import TaskSpec, TaskValidated, TokenEstimate, subjects
from contracts.policy import BudgetLimits, Defaults, Policy
from services.stack import Services, nats_server
from shared.bus import Bus
from shared.config import Settings
from shared.policy import apply_policy

REPLICAS = 3
TENANTS = ("default", "acme", "globex", "initech")
UNLIMITED = BudgetLimits(daily_tokens=10**12, hourly_tokens=10**12)
ISOLATED_ENV = {"CORRAL_CONFIG": "", "CORRAL_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
_decision = msgspec.json.Decoder(dict)


class Run(msgspec.Struct):
    name: str
    tasks: int
    users: int
    decided: int
    admitted: int
    elapsed_s: float
    per_s: float
    conflicts: int
    conflicts_per_admission: float


async def measure(bus: Bus, name: str, people: list[tuple[str, str]], tasks: int, in_flight: int,
                  timeout_s: float) -> Run:
    """Publish `tasks` validated tasks over `people` (tenant, user), `in_flight` at a time; wait for every decision."""
    prefix = f"{name}-{time.monotonic_ns():x}"
    decided: set[str] = set()
    admitted = 0
    all_in = anyio.Event()

    async def on_decision(msg: Msg) -> None:
        nonlocal admitted
        event = _decision.decode(msg.data)
        if event["task_id"].startswith(prefix) and event["task_id"] not in decided:
            decided.add(event["task_id"])
            admitted += event["kind"] == "task.admitted"
            if len(decided) == tasks:
                all_in.set()

    subs = [await bus.nc.subscribe(subject, cb=on_decision, pending_msgs_limit=1_000_000)
            for subject in (subjects.ALL_ADMITTED, subjects.ALL_REJECTED)]
    conflicts_before = await conflicts(bus)
    slots = anyio.Semaphore(in_flight)
    started = time.perf_counter()

    async def publish(n: int) -> None:
        tenant, user = people[n % len(people)]
        task = TaskValidated(task_id=f"{prefix}-{n}", tenant=tenant, user=user,
                             spec=TaskSpec(agent="research", prompt="bench"),
                             estimate=TokenEstimate(prompt_tokens=10, max_output_tokens=90))
        try:
            await bus.emit(subjects.task_validated(tenant), task)
        finally:
            slots.release()

    with anyio.move_on_after(timeout_s):
        async with anyio.create_task_group() as tg:
            for n in range(tasks):
                await slots.acquire()
                tg.start_soon(publish, n)
        await all_in.wait()
    elapsed = time.perf_counter() - started
    for sub in subs:
        await sub.unsubscribe()
    retried = await conflicts(bus) - conflicts_before
    return Run(name=name, tasks=tasks, users=len({u for _, u in people}), decided=len(decided), admitted=admitted,
               elapsed_s=round(elapsed, 2), per_s=round(len(decided) / elapsed, 1), conflicts=retried,
               conflicts_per_admission=round(retried / max(1, len(decided)), 3))


async def conflicts(bus: Bus) -> int:
    """CAS retries since start, summed over the budget replicas that answer `$SRV.STATS`."""
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    total, seen = 0, 0
    try:
        await bus.nc.publish("$SRV.STATS.corral-budget", b"", reply=inbox)
        with anyio.move_on_after(1.0):
            async for msg in sub.messages:
                stats = msgspec.json.decode(msg.data) if msg.data else {}
                endpoints = stats.get("endpoints") or [{}]
                total += (endpoints[0].get("data") or {}).get("conflicts", 0)
                seen += 1
                if seen == REPLICAS:
                    break
    finally:
        await sub.unsubscribe()
    return total


async def replicas_ready(bus: Bus, timeout_s: float) -> None:
    with anyio.fail_after(timeout_s):
        while True:
            inbox = bus.nc.new_inbox()
            sub = await bus.nc.subscribe(inbox)
            await bus.nc.publish("$SRV.PING.corral-budget", b"", reply=inbox)
            answered = 0
            with anyio.move_on_after(0.5):
                async for msg in sub.messages:
                    answered += bool(msg.data)
                    if answered == REPLICAS:
                        break
            await sub.unsubscribe()
            if answered == REPLICAS:
                return


async def bench(url: str, args: argparse.Namespace) -> list[Run]:
    settings = Settings(nats_url=url)
    async with Bus.connect(settings, "bench-budget") as bus:
        await apply_policy(await bus.policy_bucket(), Policy(
            description="bench: limits that admit everything",
            defaults=Defaults(budget=UNLIMITED, tenant_budget=UNLIMITED)))
        await replicas_ready(bus, 60)
        many = [(TENANTS[n % len(TENANTS)], f"u{n:05d}") for n in range(args.users)]
        await measure(bus, "warmup", many[:200], 200, args.in_flight, args.timeout)
        return [
            await measure(bus, "contention", [("default", "hot-user")], args.tasks, args.in_flight, args.timeout),
            await measure(bus, "spread", many, args.users, args.in_flight, args.timeout),
        ]


def print_runs(runs: list[Run], console: Console) -> None:
    table = Table(title=f"Budget admissions, {REPLICAS} replicas (127.0.0.1)")
    for column in ("run", "tasks", "users", "decided", "admitted", "seconds", "admitted/s", "CAS retries",
                   "retries/task"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in runs:
        table.add_row(r.name, f"{r.tasks:,}", f"{r.users:,}", f"{r.decided:,}", f"{r.admitted:,}", f"{r.elapsed_s}",
                      f"{r.per_s:,.0f}", f"{r.conflicts:,}", f"{r.conflicts_per_admission:.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="admissions for the one contended user (default 2000)")
    parser.add_argument("--users", type=int, default=10_000, help="users (one admission each) in the spread run")
    parser.add_argument("--in-flight", type=int, default=256, help="publishes in flight at once (default 256)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a run may take at most (default 120)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="corral-bench-budget-") as tmp, nats_server(Path(tmp)) as url:
        replicas = Services(url, Path(tmp) / "logs", env=ISOLATED_ENV)
        try:
            for _ in range(REPLICAS):
                replicas.start_one("budget")
            runs = anyio.run(bench, url, args, backend_options={"use_uvloop": True})
        finally:
            replicas.stop()
    print_runs(runs, console)
    if args.json:
        args.json.write_bytes(msgspec.json.encode(runs))
    return 0 if all(r.decided == r.tasks for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
