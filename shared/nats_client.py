"""nats-py's client with three of its per-message costs taken out.

- **Writes.** nats-py wakes its flusher for every publish and ack and writes what is
  pending at once, so a service handling 64 messages at a time made one write
  syscall per command: a third of the executor's CPU in a profile. Here the flusher
  yields to the event loop first, again while the last pass still added commands (at
  most FLUSH_PASSES times), so every task that is ready adds its commands to the same
  write. `python -m tests.bench --skip-floor`: one pass 240 tasks/s; four 310-325;
  eight 309 (2026-11-27, before the changes that followed).
- **Requests** (every publish to a stream and every KV write is one). nats-py asks the
  OS for random bytes to add to a token its NUID already makes unique, and waits with
  `asyncio.wait_for`; here the token is the NUID alone and the timeout is a timer on
  the reply's future. `python -m tests.bench.consume`: 21-25 µs of CPU per publish
  with nats-py's, 16 with this.
- **Publish acks** (every emit and every KV write waits for one). nats-py parses each
  with `json.loads` and a dataclass's `from_response`, 3.2 µs; msgspec takes 0.2.

It also tells whoever asks (`on_reconnect`) the moment the connection is back, so a KV
watch replaces its consumer then (shared/watch.py), not after missed heartbeats.

The first two override private methods, and the third reimplements JetStream's
publish (shared/kv.py also calls KeyValue._update, for a write's TTL), so nats-py is
pinned to 2.x in pyproject.toml; tests/test_bus.py checks that nothing is lost,
reordered or left waiting, and what a publish returns or raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionDrainingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NoStreamResponseError

FLUSH_PASSES = 4


class _PubAck(msgspec.Struct):
    """The stream's reply to a publish: where it was stored, or why not."""

    stream: str = ""
    seq: int = 0
    duplicate: bool | None = None
    domain: str | None = None
    error: dict[str, Any] | None = None


_decode_pub_ack = msgspec.json.Decoder(_PubAck).decode


class TunedClient(Client):
    _request_loop: asyncio.AbstractEventLoop | None = None  # asking for it costs a getpid on Python 3.11

    def __init__(self) -> None:
        super().__init__()
        self._reconnect_listeners: set[Callable[[], None]] = set()

    async def connect(self, *args: Any, reconnected_cb: Callable[[], Awaitable[None]] | None = None,
                      **kwargs: Any) -> None:
        async def reconnected() -> None:
            for listener in list(self._reconnect_listeners):
                listener()
            if reconnected_cb is not None:
                await reconnected_cb()

        await super().connect(*args, reconnected_cb=reconnected, **kwargs)

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` each time the connection is back (subscriptions renewed); returns what stops that."""
        self._reconnect_listeners.add(listener)
        return lambda: self._reconnect_listeners.discard(listener)

    def jetstream(self, **opts: Any) -> TunedJetStream:
        return TunedJetStream(self, **opts)

    @property
    def uses_tls(self) -> bool:
        """Whether the server this connection reached required TLS, so nats-py upgraded to it."""
        return bool(self._server_info.get("tls_required"))

    async def _flusher(self) -> None:
        while self.is_connected and not self.is_connecting:
            waiting = [await self._flush_queue.get()]
            size = -1
            for _ in range(FLUSH_PASSES):  # other ready tasks queue their commands, while they still add some
                if self._pending_data_size == size:
                    break
                size = self._pending_data_size
                await asyncio.sleep(0)
            while not self._flush_queue.empty():
                waiting.append(self._flush_queue.get_nowait())
            try:
                if self._pending_data_size > 0:
                    self._transport.writelines(self._pending[:])
                    self._pending = []
                    self._pending_data_size = 0
                    await self._transport.drain()
            except OSError as exc:
                await self._error_cb(exc)
                await self._process_op_err(exc)
                break
            except (asyncio.CancelledError, RuntimeError, AttributeError):
                break
            finally:
                for future in waiting:
                    if not future.done():
                        future.set_result(None)

    async def _request_new_style(self, subject: str, payload: bytes, timeout: float = 1,
                                 headers: dict[str, Any] | None = None) -> Msg:
        if self.is_draining_pubs:
            raise ConnectionDrainingError
        if not self._resp_sub_prefix:
            await self._init_request_sub()
        token = self._nuid.next().decode()  # nats-py's reply callback reads the token after the prefix
        loop = self._request_loop or asyncio.get_running_loop()
        self._request_loop = loop
        future: asyncio.Future[Msg] = loop.create_future()
        self._resp_map[token] = future
        timer = loop.call_later(timeout, _time_out, future)
        try:
            await self.publish(subject, payload, reply=self._resp_sub_prefix.decode() + token, headers=headers)
            return await future
        finally:
            timer.cancel()
            self._resp_map.pop(token, None)


class TunedJetStream(JetStreamContext):
    """nats-py's JetStream context, its publish decoding the ack with msgspec. KV buckets made from
    it (`key_value`, `create_key_value`) write through this publish too."""

    async def publish(self, subject: str, payload: bytes = b"", timeout: float | None = None,
                      stream: str | None = None, headers: dict[str, Any] | None = None,
                      msg_ttl: float | None = None) -> api.PubAck:
        if stream is not None:  # a header of its own: nats-py's path
            return await super().publish(subject, payload, timeout, stream, headers, msg_ttl)
        if msg_ttl is not None:  # seconds, as nats-py sends it
            headers = {**(headers or {}), api.Header.MSG_TTL: str(int(msg_ttl))}
        try:
            msg = await self._nc.request(subject, payload, timeout=self._timeout if timeout is None else timeout,
                                         headers=headers)
        except NoRespondersError:
            raise NoStreamResponseError from None
        ack = _decode_pub_ack(msg.data)
        if ack.error is not None:
            APIError.from_error(ack.error)  # raises the error's own class (e.g. a wrong last sequence)
        return api.PubAck(stream=ack.stream, seq=ack.seq, domain=ack.domain, duplicate=ack.duplicate)


def _time_out(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(NatsTimeout())
