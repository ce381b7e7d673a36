"""`corral dashboard`: the web dashboard, served on this machine."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Annotated

import anyio
import typer

from services.cli.common import ConfigOption, NatsOption, call, console

if TYPE_CHECKING:
    from services.client import Client

app = typer.Typer()


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: any free one)")] = 8470,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Serve the web dashboard (the last hour's charts, queues, breakers, alerts, a task lookup) until Ctrl-C."""
    from services.dashboard.server import serve

    async def go(client: Client) -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, stop)
            await serve(client, host, port, stop,
                        lambda url: console.print(f"dashboard at {url}", markup=False, highlight=False))
            tg.cancel_scope.cancel()

    call(nats, config, go)


async def _stop_on_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return
