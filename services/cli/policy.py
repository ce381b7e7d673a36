"""`corral policy …`: apply, show, list and roll back versions of the policy document."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import anyio
import msgspec
import typer
from rich.table import Table

from services.cli.common import console, fail, resolve_settings
from shared import policy as store
from shared.bus import Bus
from shared.errors import CorralError

app = typer.Typer(help="The policy: limits, budgets, prices, tools, agents, breakers (one TOML file).",
                  no_args_is_help=True)
NatsOption = Annotated[Optional[str], typer.Option("--nats", help="NATS URL; default: CORRAL_NATS_URL")]


def _with_bucket(nats: str | None, action):
    """Run ACTION on the policy bucket; a Corral error is printed and exits 2."""

    async def go():
        async with Bus.connect(resolve_settings(nats, None), "policy-cli") as bus:
            return await action(await bus.policy_bucket())

    try:
        return anyio.run(go)
    except CorralError as exc:
        fail(exc, 2)


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(help="policy TOML file", exists=True, dir_okay=False)],
    nats: NatsOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate only; store nothing")] = False,
) -> None:
    """Validate FILE and make it the current policy (a new version). Services switch within a second."""
    try:
        policy = store.load_policy_file(file)
    except store.PolicyError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if dry_run:
        console.print(f"{file} is a valid policy ({len(policy.tenants)} tenants, {len(policy.agents)} agents)")
        return
    version = _with_bucket(nats, lambda kv: store.apply_policy(kv, policy))
    shadow = " [yellow](shadow mode: decisions are recorded, not enforced)[/]" if policy.shadow else ""
    console.print(f"policy version {version} applied from {file}{shadow}")


@app.command()
def show(
    version: Annotated[Optional[int], typer.Option(help="a past version (default: current)")] = None,
    nats: NatsOption = None,
) -> None:
    """Print the current (or a past) policy as JSON, every default filled in."""
    number, policy = _with_bucket(nats, lambda kv: store.read_policy(kv, version))
    console.print(f"# policy version {number}{' (built-in defaults)' if number == 0 else ''}")
    console.print_json(msgspec.json.encode(policy).decode())


@app.command()
def history(nats: NatsOption = None) -> None:
    """List the kept versions."""
    versions = _with_bucket(nats, store.policy_versions)
    table = Table("version", "shadow", "tenants", "description")
    for number, policy in versions:
        table.add_row(str(number), str(policy.shadow), ", ".join(policy.tenants), policy.description)
    console.print(table if versions else "no policy applied yet: the built-in defaults are in effect")


@app.command()
def rollback(
    to: Annotated[Optional[int], typer.Option(help="version to return to (default: the one before)")] = None,
    nats: NatsOption = None,
) -> None:
    """Make an earlier version current again (stored as a new version)."""
    number = _with_bucket(nats, lambda kv: store.rollback(kv, to))
    console.print(f"rolled back: version {number} is current")
