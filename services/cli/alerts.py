"""`corral alerts`: what fires now; `alerts history`: the latest firings and resolutions; `alerts silence RULE
--for 1h`: the rule neither fires nor sends for that long (`--for 0` lifts it). The monitor answers each."""

from __future__ import annotations

import getpass
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli.common import call, console

app = typer.Typer(help="Alerts: those firing (no command), their history, silences.")
NatsOption = Annotated[Optional[str], typer.Option("--nats", help="NATS URL(s); default: CORRAL_NATS_URL or config")]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="TOML settings file (or $CORRAL_CONFIG)")]
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@app.callback(invoke_without_command=True)
def alerts(ctx: typer.Context, nats: NatsOption = None, config: ConfigOption = None) -> None:
    """List the alerts firing now, and the silences in force."""
    if ctx.invoked_subcommand:
        return
    reply = call(nats, config, lambda client: client.alerts())
    print_alerts("Firing alerts", reply.firing, console)
    print_silences(reply.silences, console)


@app.command("history")
def history(nats: NatsOption = None, config: ConfigOption = None) -> None:
    """The latest firings and resolutions, oldest first."""
    reply = call(nats, config, lambda client: client.alerts(history=True))
    print_alerts("Alert history", reply.history, console)


@app.command("silence")
def silence(rule: Annotated[str, typer.Argument(help="the rule's name, as in the policy")],
            for_: Annotated[str, typer.Option("--for", help="how long: 30m, 1h, 2d (0: lift the silence)")] = "1h",
            nats: NatsOption = None, config: ConfigOption = None) -> None:
    """Silence a rule: it neither fires nor sends until the time is up."""
    seconds = duration(for_)
    reply = call(nats, config, lambda client: client.silence(rule, seconds, by=getpass.getuser()))
    print_silences(reply.silences, console)


def duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise typer.BadParameter(f"--for is a number with s, m, h or d (e.g. 1h), not {text!r}")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def print_alerts(title: str, events, out: Console) -> None:
    table = Table(title=title)
    for column in ("when", "what", "rule", "severity", "scope", "value", "threshold"):
        table.add_column(column)
    for event in events:
        fired = type(event).__name__ == "Alert"
        table.add_row(f"{event.occurred_at:%Y-%m-%d %H:%M:%S}", "firing" if fired else "resolved", event.rule,
                      event.severity, event.scope, f"{event.value:.4g}", f"{event.threshold:.4g}")
    out.print(table if events else f"{title}: none")


def print_silences(silences: dict[str, float], out: Console) -> None:
    for rule, until in sorted(silences.items()):
        out.print(f"silenced: {rule} until {datetime.fromtimestamp(until, UTC):%Y-%m-%d %H:%M:%S} UTC")
