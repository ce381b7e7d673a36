"""`corral contracts`: write the contracts' JSON Schemas, for publishers in other languages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from services.cli.common import console

app = typer.Typer()


@app.command()
def contracts(
    out: Annotated[Optional[Path], typer.Option(help="directory for the schemas (default: contracts/schemas)")] = None,
) -> None:
    """Write a JSON Schema per contract, for publishers in other languages."""
    from contracts.schema import SCHEMA_DIR, write_schemas

    for path in write_schemas(out or SCHEMA_DIR):
        console.print(f"wrote {path}")
