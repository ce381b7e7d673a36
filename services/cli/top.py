"""`corral top`: a terminal dashboard of the monitor's figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from services.cli.common import ConfigOption, NatsOption, call, console

if TYPE_CHECKING:
    from services.client import Client

app = typer.Typer()


@app.command()
def top(
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit (for scripts)")] = False,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Throughput, latency, error rate, tokens and cost per hour, queues and breakers, refreshed every
    second; `q` or Ctrl-C quits."""
    from services.dashboard import top as view

    async def go(client: Client) -> None:
        await (view.once if once else view.live)(client.status, console)

    try:
        call(nats, config, go)
    except KeyboardInterrupt:
        pass
