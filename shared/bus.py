"""The connection to NATS: connect with reconnect, declare streams, publish events.

`Bus.emit` is what handlers receive to publish: it sets `Nats-Msg-Id` from the
event's dedup key (so a retried publish is stored once) and carries the trace.

A process signs in with its own credential (`Settings.nats_credentials`, from
`corral auth init`) and may use TLS (`nats_tls_*`). The server allows each identity
only its own subjects (services/auth.py); a publish or subscription outside them
is refused by the server and logged here with the subject.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError
from nats.js.kv import KeyValue

from contracts import subjects
from shared import tracing
from shared.config import Settings
from shared.errors import (
    CannotConnect,
    CredentialRefused,
    InsecureConnection,
    NatsServerTooOld,
    TransientError,
    UntrustedServer,
)
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
    async def connect(cls, settings: Settings, service: str, *, tenant: str | None = None,
                      inbox: str | None = None) -> AsyncIterator[Bus]:
        """Connect (waiting for the server if it is still starting), declare streams; on exit
        flush what is written (acks) and close. Publishes were confirmed already.

        With `tenant`: a tenant's publisher, which may not touch streams (nothing is declared) and
        hears replies under its own inbox prefix (`subjects.tenant_inbox`). With `inbox`: a client of the
        services' endpoints only (a reviewer), hearing replies under that prefix, declaring nothing either."""
        prefix = subjects.tenant_inbox(tenant) if tenant else inbox
        nc = await _connect(settings, service, inbox_prefix=prefix)
        try:
            js = nc.jetstream(timeout=10)
            if prefix is None:
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


async def _connect(settings: Settings, service: str, inbox_prefix: str | None = None) -> Client:
    servers = [url.strip() for url in settings.nats_url.split(",")]
    options = {**_credential_options(settings), **_tls_options(settings)}
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        nc = TunedClient()
        refusal = _Refusal(settings, service)
        try:
            await nc.connect(
                servers=servers,
                name=service,
                connect_timeout=2,
                max_reconnect_attempts=-1,  # once connected, keep trying for ever
                reconnect_time_wait=0.5,
                pending_size=64 * 1024 * 1024,
                error_cb=refusal.on_error,
                **options,
            )
        except CannotConnect:
            with anyio.move_on_after(1):  # after a failed TLS handshake nats-py waits on a socket closed already
                await nc.close()
            raise
        except (NoServersError, OSError, NatsTimeout) as exc:
            if attempt == CONNECT_ATTEMPTS:
                raise NoServersError(f"no NATS server at {settings.nats_url}: {exc!r}") from exc
            log.warning("%s: waiting for NATS at %s (%s)", service, settings.nats_url, exc)
            await anyio.sleep(0.5)
        else:
            refusal.connected = True
            await _require_server_version(nc)
            await _require_tls(nc, settings, servers)
            return nc
    raise AssertionError("unreachable")


AUTH_ERRORS = ("authorization violation", "authentication")
"""What nats-server says when it turns a credential away (unknown key, revoked, expired, missing)."""


class _Refusal:
    """nats-py's error callback. While first connecting, a refused credential or an untrusted certificate ends
    the attempt (nats-py would retry it for ever) with what to do; afterwards every asynchronous error, such as
    a permissions violation naming the subject, is logged."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.connected = False

    async def on_error(self, exc: Exception) -> None:
        if not self.connected:
            if isinstance(exc, NatsError) and any(words in str(exc).lower() for words in AUTH_ERRORS):
                raise CredentialRefused(self._advice(exc))
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise UntrustedServer(f"the NATS server at {self.settings.nats_url} presented a certificate "
                                      f"{self.service} does not trust ({exc.verify_message}): set nats_tls_ca "
                                      f"(CORRAL_NATS_TLS_CA) to the CA that signed it")
        log.error("%s: NATS: %s", self.service, exc)

    def _advice(self, exc: Exception) -> str:
        where, path = self.settings.nats_url, self.settings.nats_credentials
        if not path:
            return (f"the NATS server at {where} wants a credential and {self.service} has none ({exc}): set "
                    f"CORRAL_NATS_CREDENTIALS (or --credentials) to a file that `corral auth init` wrote")
        return (f"the NATS server at {where} refused {self.service}'s credential {path} ({exc}): it knows no such "
                f"identity (never added, or revoked). Make one with `corral auth init` in the data dir the server's "
                f"configuration comes from, then reload the server (`corral up` does both), or ask its operator")


def _credential_options(settings: Settings) -> dict[str, Any]:
    path = settings.nats_credentials
    if not path:
        return {}
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CredentialRefused(f"cannot read the NATS credential {path} ({exc.strerror}): point "
                                f"CORRAL_NATS_CREDENTIALS at a file that `corral auth init` wrote") from exc
    return {"user_credentials": path} if path.endswith(".creds") else {"nkeys_seed": path}


def _tls_options(settings: Settings) -> dict[str, Any]:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return {}
    context = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
    if settings.nats_tls_cert:
        context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
    return {"tls": context}


async def _require_tls(nc: Client, settings: Settings, servers: list[str]) -> None:
    """A connection that asked for TLS and was not given it is closed: nats-py would go on in plain text."""
    wanted = settings.nats_tls_ca or settings.nats_tls_cert or any(url.startswith("tls://") for url in servers)
    if not wanted or nc.uses_tls:
        return
    where = nc.connected_url.netloc if nc.connected_url else "?"
    await nc.close()
    raise InsecureConnection(f"TLS was asked for, and the NATS server at {where} does not offer it: configure TLS "
                             f"on the server, or connect without the nats_tls_* settings and a tls:// URL")


async def _require_server_version(nc: Client) -> None:
    found = nc.connected_server_version
    if (found.major, found.minor, found.patch) >= MIN_SERVER_VERSION:
        return
    where = nc.connected_url.netloc if nc.connected_url else "?"
    await nc.close()
    needed = ".".join(map(str, MIN_SERVER_VERSION))
    raise NatsServerTooOld(f"the NATS server at {where} runs nats-server {found.major}.{found.minor}.{found.patch};"
                           f" Corral needs {needed} or later (per-message TTL in KV buckets): upgrade the server")
