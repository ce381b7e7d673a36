"""What every command group shares: the --nats and --config options, settings from them, the
console, and running one async call against the stack with its failures printed as exit codes.

Command groups import this module and no other module of the package.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional, TypeVar

import anyio
import typer
from rich.console import Console
from rich.table import Table

from shared.config import Settings, load_settings
from shared.errors import CorralError

if TYPE_CHECKING:
    from services.client import Client

T = TypeVar("T")

console = Console()

NatsOption = Annotated[Optional[str],
                       typer.Option("--nats", help="NATS URL(s); default: CORRAL_NATS_URL or the config")]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="TOML settings file (default: $CORRAL_CONFIG)")]
TaskTenantOption = Annotated[str, typer.Option("--tenant", help="the task's tenant: a task id names one task per tenant")]
DATA_DIR = Path(".data")
"""Where `corral up` keeps the embedded server's store, logs and identities (auth/)."""


def resolve_settings(nats: str | None, config: Path | None, identity: str = "operator") -> Settings:
    """The settings from CONFIG (or $CORRAL_CONFIG) and the environment, with --nats over them; with no
    credential set, IDENTITY's under DATA_DIR/auth when there is one."""
    from services import auth

    settings = auth.default_credential(load_settings(config), DATA_DIR, identity)
    return settings.with_changes(nats_url=nats) if nats else settings


def fail(exc: Exception, code: int) -> NoReturn:
    """Print the error on one line and end the command with CODE."""
    console.print(f"[red]error[/]: {exc}")
    raise typer.Exit(code) from None


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run FN to its end; a timeout or a Corral error is printed and ends the command with 3."""
    try:
        return anyio.run(fn, backend_options={"use_uvloop": True})
    except TimeoutError:
        console.print("[red]timed out[/]: is the stack running? (`corral up`, or pass --nats)")
        raise typer.Exit(3) from None
    except CorralError as exc:
        fail(exc, 3)


def call(nats: str | None, config: Path | None, action: Callable[[Client], Awaitable[T]]) -> T:
    """Connect as the CLI, await ACTION(client), close; a bad setting or a failure as in `run`."""
    from services.client import Client  # imported on first use, so `corral --help` does not load it

    async def go() -> T:
        async with Client.connect(resolve_settings(nats, config), "cli") as client:
            return await action(client)

    return run(go)


def scope_table(lines: list, title: str | None = None) -> Table:
    """The monitor's per-scope windows (ScopeLine of services.dashboard.samples), one line a scope."""
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
