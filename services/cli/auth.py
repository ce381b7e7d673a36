"""`corral auth`: the identities that may connect to NATS, and what each may publish and subscribe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from services.cli.common import DATA_DIR, console
from shared.errors import CorralError

app = typer.Typer(help="Identities: who may connect to NATS, and what each may publish and subscribe.",
                  no_args_is_help=True)
AuthDataDir = Annotated[Path, typer.Option("--data-dir", help="the identities are in its auth/ directory")]


@app.command("init")
def init(
    tenant: Annotated[Optional[list[str]], typer.Option(help="a tenant to make a credential for (repeat)")] = None,
    reviewer: Annotated[Optional[list[str]], typer.Option(help="a reviewer of approvals to make a credential for "
                                                               "(repeat)")] = None,
    data_dir: AuthDataDir = DATA_DIR,
) -> None:
    """Make the missing identities (every service kind, the operator, each --tenant and --reviewer), keep the existing keys, and
    write the server's configuration; an embedded server running on DATA_DIR reloads it."""
    from services import auth
    from services.stack import reload_note

    try:
        found = auth.init(auth.auth_dir(data_dir), tenant or (), reviewer or ())
    except CorralError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(auth.table(found))
    console.print(reload_note(data_dir))


@app.command("show")
def show(data_dir: AuthDataDir = DATA_DIR) -> None:
    """List the identities, their credential files and what each may publish and subscribe."""
    from services import auth

    console.print(auth.table(auth.identities(auth.auth_dir(data_dir))))


@app.command("revoke")
def revoke(
    identity: Annotated[str, typer.Argument(help="e.g. tenant-acme; a service kind or `operator` gets a new key "
                                                 "at the next `corral auth init` or `corral up`")],
    data_dir: AuthDataDir = DATA_DIR,
) -> None:
    """Delete an identity's key and drop it from the server's configuration; an embedded server running on
    DATA_DIR reloads it and cuts off its connections."""
    from services import auth
    from services.stack import reload_note

    try:
        auth.revoke(auth.auth_dir(data_dir), identity)
    except CorralError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(f"revoked {identity}; {reload_note(data_dir)}")
