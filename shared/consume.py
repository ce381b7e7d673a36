"""The consume loop: a durable pull consumer feeding a handler, with a chosen ack policy.

- ack after the handler returns (its effects are durable by then: publishes and
  KV writes wait for the server's acknowledgement);
- nak with a delay when the handler raises TransientError (NotYet: the same, quietly);
- term a poison message (undecodable, or PoisonMessage, or failing on its last
  delivery, transiently or not) and record it with the reason in the dead-letter stream.

"Undecodable" is whatever the decoder raises: malformed JSON, a schema refusal, but
also a RecursionError (msgspec's answer to JSON nested deeper than the interpreter's
recursion limit) or a bug in a hand-written decoder. A dead letter keeps a bounded
prefix of the message with its size and hash, so it fits in one message however large
the original was: a message is never accepted and then lost for want of room.

Handlers see only the decoded contract; no NATS and no span plumbing. One that must know
more than the body (the guard: which tenant's subject it came on, and when it arrived)
asks for a Delivery with it: what the stream says of the message, which its publisher
cannot set.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import ServiceUnavailableError

from contracts import DeadLetter, subjects
from contracts.events import DEAD_LETTER_PAYLOAD_BYTES, DEAD_LETTER_REASON_CHARS, clip
from shared import tracing
from shared.bus import Bus
from shared.errors import NotYet, PoisonMessage, TransientError, Undecodable
from shared.streams import declare_consumer

log = logging.getLogger(__name__)
T = TypeVar("T")
Decode = Callable[[bytes], T]
Handler = Callable[[T], Awaitable[None]]
DeliveredHandler = Callable[[T, "Delivery"], Awaitable[None]]
FETCH_TIMEOUT_S = 1.0
UNAVAILABLE_WAIT_S = 0.1
"""Pause before fetching again after JetStream said it is unavailable."""
_delivery: ContextVar[int] = ContextVar("corral_delivery", default=1)


def delivery() -> int:
    """Which delivery of its message the running handler is on (1: the first), for a handler that
    waits a bounded number of times (raising NotYet) before it goes ahead anyway."""
    return _delivery.get()


class Delivery(msgspec.Struct, frozen=True):
    """What the stream says of one delivered message: facts its publisher cannot choose."""

    subject: str
    stream_seq: int
    """Its sequence in the stream: the same on every redelivery, another for another message."""
    stored_at: datetime
    """When the stream stored it (UTC): Corral's clock, not the publisher's."""
    number: int
    """Which delivery of it this is (1: the first)."""


class ConsumerStats(msgspec.Struct):
    """Counts one consumer loop keeps; exposed in the service's $SRV.STATS."""

    handled: int = 0
    redelivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    errors: int = 0
    unavailable: int = 0
    """Fetches JetStream answered 503 to (no JetStream yet: a server restarting), each tried again."""


class Consumer(Generic[T]):
    """One durable consumer of one service process."""

    def __init__(
        self,
        bus: Bus,
        stream: str,
        config: ConsumerConfig,
        decode: Decode[T],
        handler: Handler[T] | DeliveredHandler[T],
        *,
        long_running: bool = False,
        with_delivery: bool = False,
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.config = config
        self.decode = decode
        self.handler = handler
        self.long_running = long_running  # send in-progress acks while the handler runs
        self.with_delivery = with_delivery  # call handler(event, Delivery) instead of handler(event)
        self._started: dict[int, tuple[Msg, float]] = {}  # id(msg) -> (msg, when its handler started)
        self.acks = config.ack_policy != AckPolicy.NONE
        self.stats = ConsumerStats()

    def stats_dict(self) -> dict[str, int]:
        return msgspec.structs.asdict(self.stats)

    @property
    def name(self) -> str:
        return self.config.durable_name or "?"

    async def run(self, stop: anyio.Event) -> None:
        """Fetch and handle messages until `stop` is set; then finish what is in flight."""
        await declare_consumer(self.bus.js, self.stream, self.config)
        sub = await self.bus.js.pull_subscribe_bind(self.name, self.stream)
        try:
            async with anyio.create_task_group() as beating:
                if self.long_running:
                    beating.start_soon(self._heartbeat)
                await self._loop(sub, stop)
                beating.cancel_scope.cancel()  # every handler has finished
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await sub.unsubscribe()

    async def _loop(self, sub: Any, stop: anyio.Event) -> None:
        handlers = HandlerTasks(self.bus.settings.concurrency)
        try:
            while not stop.is_set():
                await handlers.room()  # wait for room before asking for more
                try:
                    msgs = await sub.fetch(handlers.free, timeout=FETCH_TIMEOUT_S)
                except (NatsTimeout, TimeoutError):  # nats-py raises either when nothing came
                    continue
                except ServiceUnavailableError:  # JetStream is not back yet (a server that restarted): ask again
                    self.stats.unavailable += 1
                    await anyio.sleep(UNAVAILABLE_WAIT_S)
                    continue
                for msg in msgs:
                    handlers.spawn(self._handle(msg))
        except BaseException:  # cancelled: so are the handlers
            handlers.cancel()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await handlers.finished()

    async def _handle(self, msg: Msg) -> None:
        deliveries = _deliveries(msg)
        if deliveries > 1:
            self.stats.redelivered += 1
        try:
            event = self.decode(msg.data)
        except Exception as exc:  # noqa: BLE001 - whatever a decoder raises, the message cannot be handled
            await self._dead_letter(msg, f"undecodable: {undecodable_reason(exc)}", deliveries)
            return
        await self._run_handler(msg, event, deliveries)

    async def _run_handler(self, msg: Msg, event: Any, deliveries: int) -> None:
        attributes = {
            "messaging.system": "nats",
            "messaging.destination.name": msg.subject,
            "messaging.consumer.group.name": self.name,
            "corral.task_id": getattr(event, "task_id", ""),
        }
        _delivery.set(deliveries)  # each message is handled in its own task, so in its own context
        try:
            args = (event, _delivery_of(msg, deliveries)) if self.with_delivery else (event,)
            with tracing.consuming(f"{self.bus.service} {self.name}", msg.headers, attributes):
                if self.long_running:
                    await self._with_progress(msg, args)
                else:
                    await self.handler(*args)
        except TransientError as exc:
            if self._last(deliveries):  # the server would drop it after this: keep it, with why
                await self._dead_letter(msg, f"still failing after {deliveries} deliveries, last: {exc!r}",
                                        deliveries)
                return
            self.stats.retried += 1
            log.log(logging.DEBUG if isinstance(exc, NotYet) else logging.WARNING, "%s: retrying %s later: %s",
                    self.name, getattr(event, "task_id", "?"), exc)
            await msg.nak(delay=exc.retry_after_s)
            return
        except PoisonMessage as exc:
            kind = "undecodable" if isinstance(exc, Undecodable) else "poison"
            await self._dead_letter(msg, f"{kind}: {exc}", deliveries)
            return
        except Exception as exc:  # a bug or an unexpected failure: counted, logged, retried, then dead-lettered
            self.stats.errors += 1
            log.exception("%s: handler failed for task %s", self.name, getattr(event, "task_id", "?"))
            if self._last(deliveries):
                await self._dead_letter(msg, f"failed {deliveries} times, last: {exc!r}", deliveries)
            else:
                await msg.nak(delay=min(30.0, 0.5 * 2**deliveries * random.random()))
            return
        if self.acks:
            await msg.ack()
        self.stats.handled += 1

    def _last(self, deliveries: int) -> bool:
        """This is the message's last delivery: the server gives up on it after (or never redelivers it)."""
        limit = self.config.max_deliver or self.bus.settings.max_deliver  # -1: the server never gives up
        return not self.acks or 0 < limit <= deliveries

    async def _with_progress(self, msg: Msg, args: tuple[Any, ...]) -> None:
        """Run the handler where `_heartbeat` sees it, while it runs."""
        self._started[id(msg)] = (msg, time.monotonic())
        try:
            await self.handler(*args)
        finally:
            del self._started[id(msg)]

    async def _heartbeat(self) -> None:
        """Tell the server every ack_wait/3 that we are still on each message handled for half that long or
        more: the first word comes at most ack_wait/2 after the handler began (with a whole third as the
        threshold it could come 2/3 in, leaving a busy process a third of the ack wait to be late by).
        One task per consumer: most handlers end long before, and cost no timer of their own."""
        every = self.config.ack_wait / 3
        while True:
            await anyio.sleep(every)
            now = time.monotonic()
            for msg, started in list(self._started.values()):
                if now - started >= every / 2:
                    try:
                        await msg.in_progress()
                    except Exception as exc:  # reconnecting: the next beat tries again
                        log.warning("%s: in-progress ack failed: %r", self.name, exc)

    async def _dead_letter(self, msg: Msg, reason: str, deliveries: int) -> None:
        self.stats.dead_lettered += 1
        log.error("%s: dead-lettering message on %s: %s", self.name, msg.subject,
                  clip(reason, DEAD_LETTER_REASON_CHARS))
        letter = DeadLetter.of(self.bus.service, msg.subject, reason, msg.data, deliveries,
                               keep_bytes=min(DEAD_LETTER_PAYLOAD_BYTES, self.bus.nc.max_payload // 8))
        subject = subjects.dead_letter(self.bus.service)
        msg_id = f"dlq:{self.name}:{msg.metadata.stream}:{msg.metadata.sequence.stream}"
        await self.bus.js.publish(subject, msgspec.json.encode(letter), headers={subjects.HEADER_MSG_ID: msg_id})
        if self.acks:
            await msg.term()


def undecodable_reason(exc: Exception) -> str:
    """Why a decoder refused a message, in words an operator can act on."""
    if isinstance(exc, RecursionError):
        return f"JSON nested too deeply ({exc})"
    if isinstance(exc, (msgspec.DecodeError, msgspec.ValidationError, PoisonMessage)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"  # a decoder's own bug: name it


class HandlerTasks:
    """The handler tasks of one consumer loop, which owns them: at most `limit` at once, cancelled with
    the loop, awaited before it returns.

    Plain asyncio tasks, not an anyio task group and semaphore: on Python 3.11 each anyio
    spawn, checkpoint and cancel scope asks for the current task, and that costs a getpid
    system call each time. `python -m tests.bench.consume` (an empty handler): 49-50 µs of
    CPU per message with anyio's, 25-33 with these."""

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._tasks: set[asyncio.Task[None]] = set()
        self._room: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()  # once: each ask costs a getpid on Python 3.11

    def spawn(self, handling: Coroutine[Any, Any, None]) -> None:
        self.free -= 1
        task = self._loop.create_task(handling)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.free += 1
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        if not task.cancelled() and task.exception() is not None:  # _run_handler catches all but bugs in itself
            log.error("consumer handler crashed", exc_info=task.exception())

    async def room(self) -> None:
        while self.free <= 0:
            self._room = self._loop.create_future()
            await self._room

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def finished(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks))


def _deliveries(msg: Msg) -> int:
    """Which delivery of `msg` this is, from its ack subject ($JS.ACK.<stream>.<consumer>.<delivered>.<stream
    seq>.<consumer seq>.<time>.<pending>). nats-py's `metadata` parses every field (3 µs); this only the one
    every message needs. The longer form with a domain and account goes to nats-py."""
    tokens = msg.reply.split(".")
    return int(tokens[4]) if len(tokens) == 9 else msg.metadata.num_delivered


def _delivery_of(msg: Msg, deliveries: int) -> Delivery:
    """From the ack subject, as `_deliveries` reads it (<stream seq> is token 5, <time> in ns token 7)."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        stream_seq, stored_at = int(tokens[5]), datetime.fromtimestamp(int(tokens[7]) / 1e9, UTC)
    else:
        metadata = msg.metadata
        stream_seq, stored_at = metadata.sequence.stream, metadata.timestamp.astimezone(UTC)
    return Delivery(subject=msg.subject, stream_seq=stream_seq, stored_at=stored_at, number=deliveries)


def decoder_for(contract: type[T] | Any) -> Decode[T]:
    """One typed decoder per process for a contract or a Union of contracts."""
    return msgspec.json.Decoder(contract).decode
