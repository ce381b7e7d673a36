"""The results: rich tables for people, one JSON file for machines and history."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from tests.bench.common import Measured
from tests.bench.floor import CHAIN, HOPS, SIDE

# What the issue asks for; shown next to the numbers, never asserted.
TARGET_RSS_MB = 150.0


def command_line() -> str:
    """Exactly how this process was started."""
    return shlex.join(sys.orig_argv)


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def ratio_of(pipeline: Measured, floor: Measured | None) -> float | None:
    return pipeline.result.per_s / floor.result.per_s if floor and floor.result.per_s else None


def median_round(runs: list[tuple[Measured, Measured | None]]) -> tuple[Measured, Measured | None]:
    """The round whose ratio (or, without a floor, pipeline rate) is the median: the one the tables show."""
    ordered = sorted(runs, key=lambda run: ratio_of(*run) or run[0].result.per_s)
    return ordered[(len(ordered) - 1) // 2]


def results(command: str, options: dict[str, Any], pipeline: Measured, floor: Measured | None,
            rounds: list[tuple[Measured, Measured | None]] | None = None) -> dict[str, Any]:
    ratio = ratio_of(pipeline, floor)
    return {
        "command": command,
        "machine": machine(),
        "options": options,
        "pipeline": _run(pipeline),
        "floor": None if floor is None else _run(floor) | {"hops": HOPS, "chain": CHAIN, "side": sorted(SIDE)},
        "ratio_to_floor": None if ratio is None else round(ratio, 4),
        "rounds": [{"pipeline_per_s": round(p.result.per_s, 1), "floor_per_s": round(f.result.per_s, 1) if f else None,
                    "ratio_to_floor": None if ratio_of(p, f) is None else round(ratio_of(p, f), 4)}
                   for p, f in rounds or [(pipeline, floor)]],
        "targets": {"peak_rss_mb_max": TARGET_RSS_MB},
    }


def _run(run: Measured) -> dict[str, Any]:
    """The run as plain data, with each process's CPU ms per task (or message)."""
    data = msgspec.to_builtins(run)
    data["result"]["lost"] = run.result.lost
    items = max(run.result.arrived, 1)
    for stats in data["processes"].values():
        stats["cpu_ms_per_item"] = round(stats["cpu_s"] * 1000 / items, 3)
    return data


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def print_tables(data: dict[str, Any], console: Console) -> None:
    console.print(_summary(data))
    console.print(_processes(data))
    for task_id, status in data["pipeline"]["lost_status"].items():
        console.print(f"[red]lost[/] {task_id}: the executor says {status}")
    console.print("[dim]All items are offered at once (--concurrency publishes in flight), so latency includes "
                  "queueing; per second = items / (first publish to last arrival).[/]")
    m = data["machine"]
    console.print(f"machine: {m['cores']} cores, Python {m['python']}, {m['platform']}")
    console.print(f"command: {data['command']}")


def _summary(data: dict[str, Any]) -> Table:
    pipe, floor, ratio = data["pipeline"], data["floor"], data["ratio_to_floor"]
    table = Table(title="Corral benchmark (SIMULATED model, no latency)")
    table.add_column("")
    table.add_column("pipeline", justify="right")
    table.add_column(f"floor ({HOPS} empty hops)", justify="right")
    rows = [
        ("tasks / messages", lambda r: f"{r['sent']:,}"),
        ("per second", lambda r: f"{r['per_s']:,.0f}"),
        ("wall time (s)", lambda r: f"{r['elapsed_s']:.2f}"),
        ("latency p50 / p95 / p99 (ms)", lambda r: f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f}"),
        ("lost", lambda r: f"[red]{r['lost']:,}[/]" if r["lost"] else "0"),
        ("outcomes", lambda r: ", ".join(f"{k} {v:,}" for k, v in sorted(r["outcomes"].items())) or "-"),
    ]
    for label, cell in rows:
        table.add_row(label, cell(pipe["result"]), cell(floor["result"]) if floor else "skipped")
    cpu = [f"{sum(p['cpu_ms_per_item'] for p in run['processes'].values()):.2f}" if run else "skipped"
           for run in (pipe, floor)]
    table.add_row("CPU ms per item, all processes", *cpu)
    table.add_row("messages through nats-server per item",
                  *[f"{run['server_msgs'] / max(run['result']['arrived'], 1):.1f}" if run else "skipped"
                    for run in (pipe, floor)])
    table.add_row("KV writes per item, by bucket", _kv_writes(pipe), "none" if floor else "skipped")
    late = pipe["late_steps"]
    table.add_row("steps posted after their task's release began", "?" if late is None else f"{late:,}",
                  "none" if floor else "skipped")
    table.add_row("CPU used by other processes", *[_other(run) for run in (pipe, floor)])
    ratio_text = "-" if ratio is None else f"{ratio:.1%}"
    table.add_row("throughput / floor", ratio_text, "")
    if len(data["rounds"]) > 1:
        table.add_row("rounds (pipeline / floor per s, ratio)", "; ".join(
            f"{r['pipeline_per_s']:,.0f} / {r['floor_per_s']:,.0f}, {r['ratio_to_floor']:.1%}" if r["floor_per_s"]
            else f"{r['pipeline_per_s']:,.0f}" for r in data["rounds"]), "(the median round is shown)")
    return table


def _kv_writes(run: dict[str, Any]) -> str:
    items = max(run["result"]["arrived"], 1)
    writes = sorted(run["kv_writes"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{bucket.removeprefix('corral_')} {count / items:.1f}" for bucket, count in writes if count) or "-"


def _other(run: dict[str, Any] | None) -> str:
    """Other load during the run, as a share of the machine: high means noisy numbers."""
    if not run:
        return "skipped"
    share = run["other_cpu_s"] / max(run["result"]["elapsed_s"] * (os.cpu_count() or 1), 1e-9)
    text = f"{run['other_cpu_s']:.1f} s ({share:.0%} of the machine)"
    return f"[yellow]{text}[/]" if share > 0.05 else text


def _processes(data: dict[str, Any]) -> Table:
    table = Table(title=f"Processes during the measured runs (target: peak RSS < {TARGET_RSS_MB:.0f} MB per service)")
    for name in ("process", "peak RSS (MB)", "CPU (s)", "CPU ms / item"):
        table.add_column(name, justify="left" if name == "process" else "right")
    for run in (data["pipeline"], data["floor"]):
        if not run:
            continue
        for name, stats in run["processes"].items():
            over = stats["peak_rss_mb"] >= TARGET_RSS_MB and not name.startswith(("nats", "floor", "bench"))
            rss = f"[red]{stats['peak_rss_mb']:.1f}[/]" if over else f"{stats['peak_rss_mb']:.1f}"
            label = f"{name} [red](exited)[/]" if name in run["crashed"] else name
            table.add_row(label, rss, f"{stats['cpu_s']:.1f}", f"{stats['cpu_ms_per_item']:.2f}")
        table.add_section()
    return table
