"""The connection to NATS: connect with reconnect, declare streams, publish events.

`Bus.emit` is what handlers receive to publish: it sets `Nats-Msg-Id` from the
event's dedup key (so a retried publish is stored once) and carries the trace.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError
from nats.js.kv import KeyValue

from contracts import subjects
from shared import tracing
from shared.config import Settings
from shared.errors import NatsServerTooOld, TransientError
from shared.nats_client import TunedClient
from shared.streams import declare_bucket, declare_streams

log = logging.getLogger(__name__)
ENCODER = msgspec.json.Encoder()
CONNECT_ATTEMPTS = 60
POLICY_HISTORY = 64  # policy versions kept for rollback
MIN_SERVER_VERSION = (2, 11, 0)
"""Buckets write per-message TTLs (nats-server 2.11+); an older server ignores them without a word,
so finished tasks' records and idle accounts would never expire."""


class Bus:
    """One process's NATS connection, JetStream context and settings."""

    def __init__(self, nc: Client, js: JetStreamContext, settings: Settings, service: str) -> None:
        self.nc = nc
        self.js = js
        self.settings = settings
        self.service = service

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: Settings, service: str) -> AsyncIterator[Bus]:
        """Connect (waiting for the server if it is still starting), declare streams; on exit
        flush what is written (acks) and close. Publishes were confirmed already."""
        nc = await _connect(settings, service)
        try:
            js = nc.jetstream(timeout=10)
            await declare_streams(js, settings)
            yield cls(nc, js, settings, service)
        finally:
            await _close(nc)

    async def emit(self, subject: str, event: Any, *, msg_id: bool = True) -> None:
        """Publish `event` durably: returns once the stream has stored it. `msg_id=False`: without its
        `Nats-Msg-Id` (a submission: the guard de-duplicates those, not the ingress stream)."""
        try:
            await self.js.publish(subject, ENCODER.encode(event), headers=_headers(event, msg_id))
        except (NatsTimeout, NoStreamResponseError) as exc:
            raise TransientError(f"publish to {subject} not acknowledged: {exc!r}") from exc

    async def notify(self, subject: str, event: Any) -> None:
        """Publish `event` without waiting for the stream to store it: for progress news that may be
        lost with a server, never for a decision. Saves the acknowledgement and the wait for it."""
        await self.nc.publish(subject, ENCODER.encode(event), headers=_headers(event))

    async def bucket(self, name: str, *, history: int = 1, ttl_s: float | None = None) -> KeyValue:
        return await declare_bucket(self.js, self.settings, name, history=history, ttl_s=ttl_s)

    async def policy_bucket(self) -> KeyValue:
        return await self.bucket(subjects.KV_POLICY, history=POLICY_HISTORY)


def _headers(event: Any, msg_id: bool = True) -> dict[str, str]:
    headers = tracing.inject({subjects.HEADER_MSG_ID: event.dedup_key()} if msg_id else {})
    if task_id := getattr(event, "task_id", None):
        headers[subjects.HEADER_TASK_ID] = task_id
    return headers


async def _close(nc: Client) -> None:
    if nc.is_closed:
        return
    if nc.is_connected:
        try:
            await nc.flush(timeout=2)
        except (NatsTimeout, TimeoutError):
            pass  # closing anyway; unacked messages are redelivered
    await nc.close()


async def _connect(settings: Settings, service: str) -> Client:
    servers = [url.strip() for url in settings.nats_url.split(",")]
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            nc = TunedClient()
            await nc.connect(
                servers=servers,
                name=service,
                connect_timeout=2,
                max_reconnect_attempts=-1,  # once connected, keep trying for ever
                reconnect_time_wait=0.5,
                pending_size=64 * 1024 * 1024,
            )
        except (NoServersError, OSError, NatsTimeout) as exc:
            if attempt == CONNECT_ATTEMPTS:
                raise NoServersError(f"no NATS server at {settings.nats_url}: {exc!r}") from exc
            log.warning("%s: waiting for NATS at %s (%s)", service, settings.nats_url, exc)
            await anyio.sleep(0.5)
        else:
            await _require_server_version(nc)
            return nc
    raise AssertionError("unreachable")


async def _require_server_version(nc: Client) -> None:
    found = nc.connected_server_version
    if (found.major, found.minor, found.patch) >= MIN_SERVER_VERSION:
        return
    where = nc.connected_url.netloc if nc.connected_url else "?"
    await nc.close()
    needed = ".".join(map(str, MIN_SERVER_VERSION))
    raise NatsServerTooOld(f"the NATS server at {where} runs nats-server {found.major}.{found.minor}.{found.patch};"
                           f" Corral needs {needed} or later (per-message TTL in KV buckets): upgrade the server")
