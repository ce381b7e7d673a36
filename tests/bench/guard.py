"""`python -m tests.bench.guard`: the guard's decision overhead at a fixed rate, and its limiter's accuracy.

Three guard replicas (OS processes, as `corral service guard` runs them) on an
embedded nats-server on 127.0.0.1; only the guard runs, so every number is the guard's.

- overhead: submissions at a fixed 1,000 a second (by default for 5 s) spread over
  1,000 users whose limits never bind. Reported: the decision time inside the guard
  (validation, tiktoken estimate, two GCRA compare-and-sets, the publish; from each
  replica's `$SRV.STATS`) and publish-to-decision latency seen by the publisher.
- accuracy: the same rate, all from ONE user limited to 20 requests a second with a
  burst of 10. GCRA allows rate x span + burst over the span between the first and
  the last decision; reported: admitted vs allowed.

It reports and asserts nothing; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

from contracts import TaskRejected, TaskSpec, TaskValidated
from contracts.policy import Defaults, Policy, RateLimit, TenantPolicy, UserPolicy
from services.client import Client
from services.monitor.handlers import percentiles
from services.stack import Services, nats_server
from shared.config import Settings
from shared.policy import apply_policy

REPLICAS = 3
LIMITED_USER = "limited"
LIMITED = RateLimit(requests_per_minute=1200, burst_requests=10, tokens_per_minute=10_000_000, burst_tokens=1_000_000)
OPEN = RateLimit(requests_per_minute=1_000_000, burst_requests=100_000, tokens_per_minute=1e9, burst_tokens=10**8)
POLICY = Policy(description="guard bench", defaults=Defaults(rate=OPEN, tenant_rate=OPEN),
                tenants={"default": TenantPolicy(users={LIMITED_USER: UserPolicy(rate=LIMITED)})})
SETTLE_S = 10.0  # after the last publish, how long decisions may still arrive


class Offered:
    """What one fixed-rate run sent and what the guard decided, with the times."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.decided: dict[str, tuple[float, TaskValidated | TaskRejected]] = {}
        self.all_decided = anyio.Event()

    def latencies_ms(self) -> list[float]:
        return [(at - self.sent[task_id]) * 1000 for task_id, (at, _) in self.decided.items()]

    def admitted(self) -> int:
        return sum(isinstance(event, TaskValidated) for _, event in self.decided.values())

    def decision_span_s(self) -> float:
        stamps = sorted(event.occurred_at.timestamp() for _, event in self.decided.values())
        return stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0


async def offer(client: Client, rate: float, seconds: float, user_of) -> Offered:
    """Publish at a fixed `rate` for `seconds` (each publish on its own, so a slow
    acknowledgement never delays the next one) and collect the guard's decisions."""
    run, total = Offered(), int(rate * seconds)

    async def submit(n: int, task_id: str) -> None:
        await client.submit(TaskSpec(agent="research", prompt=f"question {n}"), tenant="default",
                            user=user_of(n), task_id=task_id)

    async def collect(events) -> None:
        async for event in events:
            if event.task_id in run.sent and isinstance(event, (TaskValidated, TaskRejected)):
                run.decided[event.task_id] = (time.perf_counter(), event)
                if len(run.decided) == total:
                    run.all_decided.set()

    async with client.events() as events, anyio.create_task_group() as tg:
        tg.start_soon(collect, events)
        start = time.perf_counter()
        for n in range(total):
            await anyio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            task_id = f"g{int(start) % 100000}-{n:06d}"
            run.sent[task_id] = time.perf_counter()
            tg.start_soon(submit, n, task_id)
        with anyio.move_on_after(SETTLE_S):
            await run.all_decided.wait()
        tg.cancel_scope.cancel()
    return run


async def measure(url: str, rate: float, seconds: float, log_dir: Path) -> dict:
    settings = Settings(nats_url=url)
    guards = Services(url, log_dir, env={"CORRAL_CONFIG": "", "CORRAL_OTLP_ENDPOINT": ""})
    try:
        async with Client.connect(settings, "bench-guard") as client:
            await apply_policy(await client.bus.policy_bucket(), POLICY)
            for _ in range(REPLICAS):
                guards.start_one("guard")
            with anyio.fail_after(60):
                while (await client.running_services())["corral-guard"] < REPLICAS:
                    pass
            await offer(client, rate, 1.0, lambda n: f"warm{n % 100}")  # warm-up, not reported
            overhead = await offer(client, rate, seconds, lambda n: f"user{n % 1000}")
            stats = await client.replica_stats("corral-guard")
            accuracy = await offer(client, rate, min(seconds, 3.0), lambda n: LIMITED_USER)
    finally:
        guards.stop()
    inside = [s["endpoints"][0]["data"] for s in stats]
    span = accuracy.decision_span_s()
    allowed = LIMITED.requests_per_minute / 60 * span + LIMITED.burst_requests
    seen = percentiles(overhead.latencies_ms())
    return {
        "rate_per_s": rate, "seconds": seconds, "replicas": REPLICAS,
        "sent": len(overhead.sent), "decided": len(overhead.decided),
        "decision_p50_ms_per_replica": [round(d["decision_p50_ms"], 2) for d in inside],
        "decision_p99_ms_per_replica": [round(d["decision_p99_ms"], 2) for d in inside],
        "publish_to_decision_p50_ms": round(seen.p50_ms, 2), "publish_to_decision_p99_ms": round(seen.p99_ms, 2),
        "limited_offered": len(accuracy.sent), "limited_admitted": accuracy.admitted(),
        "limited_allowed": round(allowed, 1), "limited_span_s": round(span, 3),
    }


def print_report(result: dict, console: Console) -> None:
    table = Table(title=f"guard: {REPLICAS} replicas, {result['rate_per_s']:.0f} submissions/s "
                        f"for {result['seconds']:.0f} s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("decided / sent", f"{result['decided']:,} / {result['sent']:,}")
    table.add_row("decision time in the guard p50 (ms, per replica)",
                  " / ".join(f"{v:.2f}" for v in result["decision_p50_ms_per_replica"]))
    table.add_row("decision time in the guard p99 (ms, per replica)",
                  " / ".join(f"{v:.2f}" for v in result["decision_p99_ms_per_replica"]))
    table.add_row("publish to decision p50 / p99 (ms)",
                  f"{result['publish_to_decision_p50_ms']:.1f} / {result['publish_to_decision_p99_ms']:.1f}")
    table.add_row(f"limiter: one user at {LIMITED.requests_per_minute / 60:.0f}/s + burst {LIMITED.burst_requests}",
                  f"offered {result['limited_offered']:,}, admitted {result['limited_admitted']:,}, "
                  f"allowed {result['limited_allowed']:.1f} over {result['limited_span_s']:.2f} s")
    ratio = result["limited_admitted"] / result["limited_allowed"] if result["limited_allowed"] else 0.0
    table.add_row("limiter accuracy (admitted / allowed)", f"{ratio:.3f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="submissions per second (default 1000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the overhead run (default 5)")
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="corral-bench-guard-") as tmp, nats_server(Path(tmp)) as url:
        result = anyio.run(measure, url, args.rate, args.seconds, Path(tmp) / "logs",
                           backend_options={"use_uvloop": True})
    print_report(result, console)
    console.print(f"command: python -m tests.bench.guard {' '.join(argv or sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
