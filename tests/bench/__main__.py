"""`python -m tests.bench`: measure the pipeline against the raw JetStream floor.

Reports and writes .data/bench/results.json; never asserts a target. Exits 1
when tasks (or floor messages) were lost, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from services.stack import nats_server
from tests.bench import floor, pipeline, report
from tests.bench.common import Measured

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / ".data" / "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Drive tasks through the whole Corral pipeline (every service as an OS process on an embedded "
                    "nats-server, SIMULATED model with no latency) and the same number of messages through a raw "
                    f"floor of the pipeline's {floor.HOPS} JetStream hops with empty handlers; report throughput, latency, ratio to the floor and peak RSS "
                    f"per service. Results also go to {OUT_DIR.relative_to(REPO)}/results.json.",
    )
    parser.add_argument("--tasks", type=int, default=2000, help="tasks (and floor messages) to measure (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="publishes in flight at once, for both runs (default 64)")
    parser.add_argument("--users", type=int, default=500,
                        help="distinct users the tasks are spread over (default 500)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds without any arrival, after the last publish, before the rest count as lost "
                             "(default 30)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="floor-then-pipeline rounds, one after another; the tables show the round with the "
                             "median ratio, and every round's ratio is listed. This machine's speed wanders by "
                             "about ±10 %% between runs: use 3 or more to compare two versions (default 1)")
    parser.add_argument("--skip-floor", action="store_true", help="measure the pipeline only")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "results.json", help="where to write the JSON")
    args = parser.parse_args(argv)
    for name in ("tasks", "concurrency", "users", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 100)  # piped or logged: keep each table row on one line
    # SIGTERM behaves like Ctrl-C, so the `finally`s below stop every process we started.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    log_dir = OUT_DIR / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp, nats_server(Path(tmp)) as url:
            console.print(f"nats-server on {url}; logs in {log_dir}")
            runs = [_round(n, args, url, log_dir, console) for n in range(1, args.rounds + 1)]
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: every process was stopped")
        return 130
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    pipe_run, floor_run = report.median_round(runs)
    data = report.results(report.command_line(), options, pipe_run, floor_run, rounds=runs)
    report.write_json(data, args.out)
    report.print_tables(data, console)
    console.print(f"results: {args.out}")
    lost = pipe_run.result.lost + (floor_run.result.lost if floor_run else 0)
    return 1 if lost else 0


def _round(n: int, args: argparse.Namespace, url: str, log_dir: Path,
           console: Console) -> tuple[Measured, Measured | None]:
    """One floor run (unless skipped), then one pipeline run."""
    prefix = f"round {n}/{args.rounds}: " if args.rounds > 1 else ""
    floor_run = None
    if not args.skip_floor:
        console.print(f"{prefix}floor: {args.tasks:,} messages through {floor.HOPS} empty hops "
                      f"({floor.CHAIN} in a chain, {len(floor.SIDE)} beside it), the best of {floor.ROUNDS} rounds…")
        floor_run = floor.run(url, log_dir, args.tasks, args.concurrency, args.timeout)
    console.print(f"{prefix}pipeline: {args.tasks:,} tasks through every service…")
    pipe_run = pipeline.run(url, log_dir, args.tasks, args.users, args.concurrency, args.timeout)
    return pipe_run, floor_run


if __name__ == "__main__":
    sys.exit(main())
