"""`python -m tests.bench.views`: what the live views and the scaling advice cost, without a server.

An hour of the dashboard's history (one report a second, nine queues, three breakers): the memory it
holds (tracemalloc), CPU per sample added, and the time and size of one `/api/history` answer (its
JSON). Then the monitor's scaling advice: CPU per round over nine consumers. It reports and asserts
nothing.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import msgspec

from contracts.policy import Scaling
from contracts.queries import Percentiles, StatusReport
from services.dashboard.samples import HOUR_S, History
from services.monitor.scaling import Backlog, Scaler

QUEUES = ("guard", "budget-admit", "budget-usage", "executor-tasks", "executor-steps", "breaker", "worker-research",
          "worker-coding", "worker-writing")


def _report(n: int) -> StatusReport:
    return StatusReport(counts={"task.submitted": n, "task.validated": n, "task.completed": n, "task.failed": n // 50,
                                "step.completed": n, "step.failed": n // 40},
                        latency=Percentiles(count=n, p50_ms=80.0, p95_ms=900.0, p99_ms=1200.0), error_rate=0.02,
                        step_error_rate=0.025, tokens_last_hour=n * 90, cost_usd=n * 0.001, cost_per_task_usd=0.001,
                        queue_depth={q: n % 7 for q in QUEUES},
                        breakers={"simulated/sim-large": "closed", "simulated/sim-small": "closed",
                                  "tool/code_interpreter": "open"}, uptime_s=float(n))


def history_figures() -> dict[str, float]:
    reports = [_report(n) for n in range(int(HOUR_S))]
    history = History()
    cpu = time.process_time()
    for n, report in enumerate(reports):
        history.add(report, at=float(n))
    per_sample_us = (time.process_time() - cpu) / len(reports) * 1e6
    tracemalloc.start()  # a second hour, traced: tracing slows what it traces, so it is not timed
    traced = History()
    for n, report in enumerate(reports):
        traced.add(report, at=float(n))
    held_mb = tracemalloc.get_traced_memory()[0] / 1e6
    tracemalloc.stop()
    wall = time.perf_counter()
    body = msgspec.json.encode(list(history.samples))
    return {"samples": len(history.samples), "held_mb": held_mb, "per_sample_us": per_sample_us,
            "history_ms": (time.perf_counter() - wall) * 1000, "history_kb": len(body) / 1000}


def advice_us(rounds: int) -> float:
    scaler, scaling = Scaler(clock=iter(range(10**9)).__next__), Scaling()
    cpu = time.process_time()
    for n in range(rounds):
        scaler.advise([Backlog(durable=q, pending=n % 300, ack_pending=n % 5, acked=n * 3) for q in QUEUES], scaling)
    return (time.process_time() - cpu) / rounds * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.views", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000, help="scaling rounds to time (default 20000)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    h = history_figures()
    print(f"dashboard history: {h['samples']:,} samples (an hour) hold {h['held_mb']:.1f} MB; "
          f"{h['per_sample_us']:.0f} µs CPU per sample added; /api/history {h['history_kb']:,.0f} kB "
          f"encoded in {h['history_ms']:.1f} ms")
    print(f"scaling advice: {advice_us(args.rounds):.0f} µs CPU per round over {len(QUEUES)} consumers "
          f"({args.rounds:,} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
