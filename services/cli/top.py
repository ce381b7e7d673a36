"""`corral top`: the monitor's figures in a terminal, one frame a second, until `q` or Ctrl-C.

The figures are services.dashboard.samples' (the web dashboard shows the same); this module draws them."""

from __future__ import annotations

import asyncio
import os
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import anyio
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from services.cli.common import ConfigOption, NatsOption, call, console, fail
from services.cli.common import scope_table

if TYPE_CHECKING:
    from services.client import Client
    from services.dashboard.samples import Sample

app = typer.Typer()
REFRESH_S = 1.0
QUIT_KEYS = b"qQ"


def frame(sample: "Sample") -> Group:
    """One screen: the headline figures, then queues, breakers, alerts and approvals."""
    figures = Table(title="Corral top", show_header=False, expand=False)
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    figures.add_row("tasks done / failed", f"{sample.tasks_done:,} / {sample.tasks_failed:,}")
    figures.add_row("throughput (tasks/s)", f"{sample.tasks_per_s:.2f}")
    figures.add_row("steps/s", f"{sample.steps_per_s:.2f}")
    figures.add_row("latency p50 / p95 / p99 (ms)", f"{sample.p50_ms:.0f} / {sample.p95_ms:.0f} / {sample.p99_ms:.0f}")
    figures.add_row("error rate (tasks / steps)", f"{sample.error_rate:.1%} / {sample.step_error_rate:.1%}")
    figures.add_row("tokens per hour", f"{sample.tokens_per_hour:,}")
    figures.add_row("cost per hour (simulated prices)", f"${sample.cost_per_hour_usd:.4f}")
    figures.add_row("cost per task", f"${sample.cost_per_task_usd:.5f}")
    if sample.approvals_waiting is not None:
        figures.add_row("approvals waiting", str(sample.approvals_waiting))
    parts = [figures, _pairs("queue (pending + unacked)", "depth", sample.queue_depth),
             _pairs("breaker", "state", sample.breakers)]
    if sample.tenants:
        parts.append(scope_table(sample.tenants, f"busiest tenants (top {len(sample.tenants)})"))
    if sample.alerts is not None:
        parts.append(_alerts(sample.alerts))
    parts.append(Text(f"{time.strftime('%H:%M:%S', time.localtime(sample.at))}  q quits", style="dim"))
    return Group(*parts)


def _pairs(name: str, value: str, items: dict) -> Table:
    table = Table(show_edge=False)
    table.add_column(name)
    table.add_column(value, justify="right")
    for key, item in sorted(items.items()):
        table.add_row(key, f"{item:,}" if isinstance(item, int) else str(item))
    if not items:
        table.add_row("(none yet)", "")
    return table


def _alerts(alerts: list) -> Table:
    table = Table(show_edge=False)
    table.add_column("firing alert")
    table.add_column("severity")
    table.add_column("scope")
    for alert in alerts:
        alert = alert if isinstance(alert, dict) else {"name": alert}
        table.add_row(str(alert.get("name") or alert.get("rule", "?")), str(alert.get("severity", "")),
                      str(alert.get("scope", "")))
    if not alerts:
        table.add_row("(none)", "", "")
    return table


async def _once(client: Client, console: Console) -> None:
    """Print one frame: two reports a second apart, so the rates are there."""
    from services.dashboard.samples import History, observe

    history = History()
    await observe(client, history, time.time())
    await anyio.sleep(REFRESH_S)
    console.print(frame(await observe(client, history, time.time())))


async def _live(client: Client, console: Console) -> None:
    """Redraw every second until `q` (when stdin is a terminal) or Ctrl-C."""
    from services.dashboard.samples import History, observe

    history = History()
    quit_pressed = anyio.Event()
    with _keys(quit_pressed), Live(frame(await observe(client, history, time.time())), console=console,
                                   auto_refresh=False, screen=console.is_terminal) as view:
        while not quit_pressed.is_set():
            with anyio.move_on_after(REFRESH_S):
                await quit_pressed.wait()
            if not quit_pressed.is_set():
                view.update(await _next_frame(client, history), refresh=True)


async def _next_frame(client: Client, history) -> Group:
    """The next frame; while the monitor does not answer, the last one with a word on that."""
    from nats.errors import Error as NatsError
    from services.dashboard.samples import observe

    try:
        return frame(await observe(client, history, time.time()))
    except (TimeoutError, NatsError) as error:
        last = frame(history.samples[-1])
        return Group(last, Text(f"the monitor did not answer ({type(error).__name__}); retrying", style="red"))


@contextmanager
def _keys(quit_pressed: anyio.Event) -> Iterator[None]:
    """While inside: keys read one at a time from a terminal stdin; `q` sets `quit_pressed`. Ctrl-C stays
    a signal (cbreak mode, not raw)."""
    if not os.isatty(sys.stdin.fileno()):
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def on_key() -> None:
        if set(os.read(fd, 64)) & set(QUIT_KEYS):
            quit_pressed.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, on_key)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@app.command()
def top(
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit (for scripts)")] = False,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Throughput, latency, error rate, tokens and cost per hour, queues and breakers, refreshed every
    second; `q` or Ctrl-C quits."""
    async def go(client: Client) -> None:
        from nats.errors import NoRespondersError

        try:
            await (_once if once else _live)(client, console)
        except NoRespondersError:
            fail(RuntimeError("no monitor answers: is the stack running? (`corral up`, or pass --nats)"), 3)

    try:
        call(nats, config, go)
    except KeyboardInterrupt:
        pass
