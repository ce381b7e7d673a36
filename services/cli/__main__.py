"""`python -m services.cli`: the `corral` command, as the stack starts its services."""

from services.cli import app

app()
