"""Run one service as a process: logging, tracing, uvloop, stop on SIGINT/SIGTERM.

Also registers the service as a NATS micro service, so `$SRV.PING`, `$SRV.INFO`
and `$SRV.STATS` find and measure every replica like any NATS service.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from contracts import subjects
from shared import tracing
from shared.bus import Bus
from shared.config import Settings
from shared.errors import CannotConnect

SERVICE_VERSION = "0.1.0"
GC_THRESHOLDS = (50_000, 20, 20)
"""Allocations between young-generation collections (Python's default is 700), and how many of those
before each older one: an older collection walks every account the budget keeps. Why and what it saves:
docs/design/0005-gc-tuning.md."""
Main = Callable[[Settings, anyio.Event], Awaitable[None]]
Endpoint = Callable[[bytes], Awaitable[bytes]]


def run_service(name: str, main: Main, settings: Settings) -> None:
    """Run `main(settings, stop)` until it returns; SIGINT/SIGTERM set `stop`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    tracing.init_tracing(f"corral-{name}", settings.otlp_endpoint)
    tune_gc()

    async def supervised() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, stop)
            await main(settings, stop)
            tg.cancel_scope.cancel()

    try:
        anyio.run(supervised, backend_options={"use_uvloop": True})
    except* CannotConnect as refused:  # no use retrying: say why and exit
        raise SystemExit(f"{name}: {refused.exceptions[0]}") from None
    finally:
        tracing.shutdown_tracing()


def tune_gc() -> None:
    """Collect cyclic garbage less often in a long-running process that allocates per message, and never
    scan what start-up made (modules, tables): call once, when start-up is done."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _stop_on_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            logging.getLogger(__name__).info("stopping: finishing messages in flight")
            stop.set()
            return


@asynccontextmanager
async def micro_service(bus: Bus, description: str, endpoints: dict[str, tuple[str, Endpoint]] | None = None,
                        stats: Callable[[], dict[str, Any]] | None = None) -> AsyncIterator[Service]:
    """Register this process as a replica of the NATS micro service named after it.

    `stats()` becomes the `data` of each endpoint in this replica's `$SRV.STATS`
    reply (every replica answers), and the `stats` endpoint (one replica answers)."""
    stats_handler = (lambda _: stats()) if stats else None
    service = await add_service(bus.nc, name=f"corral-{bus.service}", version=SERVICE_VERSION,
                                description=description, stats_handler=stats_handler)
    endpoints = dict(endpoints or {})
    if stats:
        async def stats_endpoint(_: bytes) -> bytes:
            return msgspec.json.encode(stats())

        endpoints["stats"] = (subjects.service_stats(bus.service), stats_endpoint)
    for name, (subject, endpoint) in endpoints.items():
        await service.add_endpoint(name=name, subject=subject, handler=_responder(endpoint))
    try:
        yield service
    finally:
        await service.stop()


def _responder(endpoint: Endpoint) -> Callable[[Request], Awaitable[None]]:
    async def respond(request: Request) -> None:
        try:
            await request.respond(await endpoint(request.data))
        except Exception as exc:  # a bad query gets an error reply, never kills the service
            await request.respond_error("500", f"{type(exc).__name__}: {exc}")

    return respond
