"""An old nats-server is refused at connect, with a message naming the version found and the one needed.

The server is real; a small TCP relay in front of it rewrites the version in the INFO line the server
sends first, as a 2.10 server would announce itself."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import anyio
import pytest
from anyio.abc import SocketStream

from shared.bus import Bus
from shared.config import Settings
from shared.errors import NatsServerTooOld
from tests.conftest import signed_in_as

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
OLD = "2.10.26"
CORRAL = str(Path(sys.executable).parent / "corral")


async def _relay(client: SocketStream, server_url: str, version: str) -> None:
    url = urlparse(server_url)
    async with client, await anyio.connect_tcp(url.hostname, url.port) as server:
        info = b""
        while not info.endswith(b"\r\n"):
            info += await server.receive()
        fields = json.loads(info.removeprefix(b"INFO ").strip())
        await client.send(b"INFO " + json.dumps({**fields, "version": version}).encode() + b"\r\n")

        async def pipe(source: SocketStream, sink: SocketStream) -> None:
            async for chunk in source:
                await sink.send(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pipe, server, client)
            await pipe(client, server)
            tg.cancel_scope.cancel()


async def _announcing(version: str, nats_url: str, tg) -> str:
    """A URL where the real server announces itself as nats-server `version`."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    tg.start_soon(listener.serve, lambda client: _relay(client, nats_url, version))
    return f"nats://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"


async def test_a_connection_to_a_server_older_than_2_11_is_refused_with_both_versions_named(settings: Settings):
    async with anyio.create_task_group() as tg:
        old_url = await _announcing(OLD, settings.nats_url, tg)
        with pytest.raises(NatsServerTooOld, match=rf"runs nats-server {OLD}; Corral needs 2\.11\.0 or later"):
            async with Bus.connect(settings.with_changes(nats_url=old_url), "test-version"):
                pass
        tg.cancel_scope.cancel()


async def test_the_same_relay_announcing_2_11_serves_a_working_connection(settings: Settings):
    """The same relay announcing 2.11.0 serves a working connection, so the refusal above is the version's."""
    async with anyio.create_task_group() as tg:
        url = await _announcing("2.11.0", settings.nats_url, tg)
        async with Bus.connect(settings.with_changes(nats_url=url), "test-version") as bus:
            assert (await bus.js.account_info()).streams >= 1
        tg.cancel_scope.cancel()


async def test_a_service_started_against_an_old_server_exits_at_once_and_says_why(settings: Settings):
    async with anyio.create_task_group() as tg:
        old_url = await _announcing(OLD, settings.nats_url, tg)
        guard = {"CORRAL_NATS_CREDENTIALS": signed_in_as(settings, "guard").nats_credentials}
        with anyio.fail_after(60):
            done = await anyio.run_process([CORRAL, "service", "guard", "--nats", old_url],
                                           check=False, env={**os.environ, **guard})
        tg.cancel_scope.cancel()
    assert done.returncode != 0
    assert f"runs nats-server {OLD}; Corral needs 2.11.0 or later" in done.stderr.decode()
