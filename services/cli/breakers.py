"""`corral breakers`: every circuit with its state, rates and since when; force one open or closed; release it.

Listing reads the breaker bucket (read-only); forcing and releasing are commands to
the breaker service, which alone writes the bucket. A forced state holds, whatever
the calls do, until it is released.
"""

from __future__ import annotations

import getpass
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from contracts.commands import BreakerAction, ControlBreaker
from contracts.state import BreakerRecord
from services.cli.common import call, console

app = typer.Typer(help="Circuit breakers: list them (no command), force one open or closed, release it.")
NatsOption = Annotated[Optional[str], typer.Option("--nats", help="NATS URL(s); default: CORRAL_NATS_URL or config")]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="TOML settings file (or $CORRAL_CONFIG)")]
Dependency = Annotated[str, typer.Argument(help="provider/model (e.g. simulated/sim-large) or tool/NAME")]


@app.callback(invoke_without_command=True)
def breakers(ctx: typer.Context, nats: NatsOption = None, config: ConfigOption = None) -> None:
    """List every breaker: state, failure and slow-call rates over its window, and since when."""
    if ctx.invoked_subcommand:
        return
    print_breakers(call(nats, config, lambda client: client.breakers()), console)


@app.command("force-open")
def force_open(dependency: Dependency, nats: NatsOption = None, config: ConfigOption = None) -> None:
    """Force a circuit open: nothing calls the dependency until `release`."""
    _control(dependency, "force_open", nats, config)


@app.command("force-closed")
def force_closed(dependency: Dependency, nats: NatsOption = None, config: ConfigOption = None) -> None:
    """Force a circuit closed: calls go through whatever their outcomes, until `release`."""
    _control(dependency, "force_closed", nats, config)


@app.command("release")
def release(dependency: Dependency, nats: NatsOption = None, config: ConfigOption = None) -> None:
    """End a forced state: the circuit starts again closed, with an empty window."""
    _control(dependency, "release", nats, config)


def _control(dependency: str, action: BreakerAction, nats: str | None, config: Path | None) -> None:
    command = ControlBreaker(dependency=dependency, action=action, operator=_operator())
    reply = call(nats, config, lambda client: client.control_breaker(command))
    forced = " (forced)" if reply.forced else ""
    console.print(f"{reply.dependency}: [bold]{reply.state}[/]{forced} — {reply.reason}")


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def print_breakers(records: list[BreakerRecord], out: Console, now: float | None = None) -> None:
    now = time.time() if now is None else now
    table = Table(title="Circuit breakers (from the breaker bucket; times UTC)")
    table.add_column("dependency", no_wrap=True)
    table.add_column("state")
    table.add_column("failed / slow", justify="right", no_wrap=True)
    table.add_column("calls", justify="right")
    table.add_column("since", no_wrap=True)
    table.add_column("why")
    for record in records:
        state = f"{record.state} (forced)" if record.forced else record.state
        if record.state == "open" and not record.forced:
            state += f", probes in {max(0.0, record.retry_at - now):.0f} s"
        colour = {"closed": "green", "open": "red", "half_open": "yellow"}[record.state]
        table.add_row(record.dependency, f"[{colour}]{state}[/]",
                      f"{record.failure_rate:g}% / {record.slow_call_rate:g}%", str(record.calls),
                      _since(record.changed_at, now), record.reason or "no transition yet")
    if not records:
        table.add_row("(none yet: a breaker appears with its dependency's first call)", "", "", "", "", "")
    out.print(table)


def _since(at: float, now: float) -> str:
    if not at:
        return "start"
    return f"{datetime.fromtimestamp(at, UTC):%H:%M:%S} ({now - at:.0f} s ago)"
