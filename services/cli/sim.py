"""`corral sim`: steer the SIMULATED provider and tools of every worker replica at run time.

    corral sim fail simulated/sim-large [--error transient|timeout|rate_limited|permanent]
    corral sim slow tool/search --latency 3
    corral sim recover simulated/sim-large

Each replica answers; the command prints how many did. Replicas started later do
not know earlier commands (core NATS, nothing stored): tell them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from contracts.commands import SimulateDependency
from contracts.events import ErrorClass
from services.cli.common import call, console

app = typer.Typer(help="Steer the SIMULATED model and tools at run time: fail, slow down or recover a dependency.",
                  no_args_is_help=True)
NatsOption = Annotated[Optional[str], typer.Option("--nats", help="NATS URL(s); default: CORRAL_NATS_URL or config")]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="TOML settings file (or $CORRAL_CONFIG)")]
Dependency = Annotated[str, typer.Argument(help="simulated/MODEL (e.g. simulated/sim-large) or tool/NAME")]


@app.command()
def fail(dependency: Dependency,
         error: Annotated[str, typer.Option(help="transient, timeout, rate_limited or permanent")] = "transient",
         retry_after: Annotated[Optional[float], typer.Option(help="seconds, with --error rate_limited")] = None,
         latency: Annotated[float, typer.Option(help="seconds each failing call takes first")] = 0.0,
         nats: NatsOption = None, config: ConfigOption = None) -> None:
    """Make every call to DEPENDENCY fail with an error class, until `recover`."""
    if error not in ("transient", "timeout", "rate_limited", "permanent"):
        raise typer.BadParameter(f"unknown error class {error!r}")
    err: ErrorClass = error  # type: ignore[assignment]
    _send(SimulateDependency(dependency=dependency, mode="fail", error=err, retry_after_s=retry_after,
                             latency_s=latency), nats, config)


@app.command()
def slow(dependency: Dependency,
         latency: Annotated[float, typer.Option(help="seconds added to every call")] = 2.0,
         nats: NatsOption = None, config: ConfigOption = None) -> None:
    """Make every call to DEPENDENCY take LATENCY seconds longer, until `recover`."""
    _send(SimulateDependency(dependency=dependency, mode="slow", latency_s=latency), nats, config)


@app.command()
def recover(dependency: Dependency, nats: NatsOption = None, config: ConfigOption = None) -> None:
    """Make DEPENDENCY behave normally again."""
    _send(SimulateDependency(dependency=dependency, mode="recover"), nats, config)


def _send(command: SimulateDependency, nats: str | None, config: Path | None) -> None:
    acks = call(nats, config, lambda client: client.simulate(command))
    if not acks:
        console.print("[yellow]no worker replica answered[/]: is the stack running?")
        raise typer.Exit(1)
    agents = ", ".join(sorted({ack.agent for ack in acks}))
    console.print(f"{len(acks)} worker replica(s) ({agents}): {command.dependency} -> {command.mode}")
