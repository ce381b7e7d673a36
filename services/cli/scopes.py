"""The monitor's per-scope windows as a compact table, one line a scope (`corral status`, `corral top`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from services.dashboard.samples import ScopeLine


def scope_table(lines: "list[ScopeLine]", title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("scope")
    for heading in ("tasks 1m / 5m / 1h", "p95 ms (5m)", "errors (5m)", "tokens/h (1h)", "$/task (1h)"):
        table.add_column(heading, justify="right")
    for line in lines:
        tasks = " / ".join(f"{line.tasks.get(window, 0):,}" for window in ("1m", "5m", "1h"))
        table.add_row(line.scope, tasks, f"{line.p95_ms:,.0f}", f"{line.error_rate:.1%}",
                      f"{line.tokens_per_hour:,.0f}", f"${line.cost_per_task_usd:.5f}")
    if not lines:
        table.add_row("(none yet)", "", "", "", "", "")
    return table
