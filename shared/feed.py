"""Reading one stream in order from a sequence on, for a service whose state is a summary it snapshots
(the monitor).

An ordered consumer (ephemeral, no acks, flow-controlled, re-created by the client from the next sequence
after a gap): each event comes with its stream sequence and the stream's receipt time, the one clock
Corral stamps and a publisher cannot. Started from the sequence after a snapshot's position, it replays
what the snapshot does not include and then goes on live, through the same handler. Every replica reads
every event (an ordered consumer is its own), so replicas fold the same events into the same figures.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared import tracing
from shared.bus import Bus

log = logging.getLogger(__name__)
T = TypeVar("T")
PENDING_MSGS = 1_000_000  # what may wait in this process before the server drops (slow consumer)
Handler = Callable[[T, float, str, int], Awaitable[None]]
"""(event, stream receipt time in Unix seconds, stream, sequence)."""


class FeedStats(msgspec.Struct):
    handled: int = 0
    undecodable: int = 0
    errors: int = 0
    position: int = 0
    replayed: int = 0
    """Events read at start that were already in the stream (the replay)."""


class StreamFeed(Generic[T]):
    def __init__(self, bus: Bus, stream: str, subjects: Sequence[str], decode: Callable[[bytes], T],
                 handler: Handler, start_after: int = 0, live: Callable[[T], None] | None = None) -> None:
        """`live`: also told each event read after the replay (what happens from now on)."""
        self.bus = bus
        self.name = stream
        self.stream = stream
        self.subjects = list(subjects)
        self.decode = decode
        self.handler = handler
        self.live = live
        self.start_after = start_after
        self.stats = FeedStats(position=start_after)
        self.replay_to = 0
        self.caught_up = anyio.Event()  # set once what the stream held at start is folded in
        self._handling = False

    async def run(self, stop: anyio.Event) -> None:
        info = await self.bus.js.stream_info(self.stream)
        self.replay_to = info.state.last_seq
        first = max(self.start_after + 1, info.state.first_seq)
        config = ConsumerConfig(filter_subjects=self.subjects, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=first)
        sub = await self.bus.js.subscribe(self.subjects[0], stream=self.stream, config=config, cb=self._on_msg,
                                          ordered_consumer=True, pending_msgs_limit=PENDING_MSGS)
        if first > self.replay_to:
            self.caught_up.set()
        try:
            while not stop.is_set() and not self.caught_up.is_set():
                await self._check_caught_up(sub, stop)
            await stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def _check_caught_up(self, sub: Any, stop: anyio.Event) -> None:
        """Caught up once the server has nothing left for the consumer and this process nothing left to
        handle (filtered subjects may leave the stream's last sequences unseen)."""
        with anyio.move_on_after(0.1):
            await stop.wait()
        try:
            info = await sub.consumer_info()
        except Exception:  # noqa: BLE001 - being re-created after a gap, or the server is busy: ask again
            return
        if info.num_pending == 0 and sub.pending_msgs == 0 and not self._handling:
            self.caught_up.set()

    async def _on_msg(self, msg: Msg) -> None:
        self._handling = True
        try:
            await self._handle(msg)
        finally:
            self._handling = False

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        seq, at = meta.sequence.stream, meta.timestamp.timestamp()
        self.stats.position = seq
        replaying = seq <= self.replay_to
        if replaying:
            self.stats.replayed += 1
        try:
            event = self.decode(msg.data)
        except Exception as exc:  # noqa: BLE001 - a RecursionError too: the event's own consumers dead-letter it
            self.stats.undecodable += 1
            log.warning("%s: not counting an undecodable message on %s: %s", self.name, msg.subject, exc)
            return
        try:
            if replaying:
                await self.handler(event, at, self.stream, seq)
            else:
                attributes = {"messaging.system": "nats", "messaging.destination.name": msg.subject,
                              "corral.task_id": getattr(event, "task_id", "")}
                with tracing.consuming(f"{self.bus.service} {self.name}", msg.headers, attributes):
                    await self.handler(event, at, self.stream, seq)
                    if self.live:
                        self.live(event)
        except Exception:  # one bad event must not stop the feed
            self.stats.errors += 1
            log.exception("%s: handler failed for a message on %s", self.name, msg.subject)
        else:
            self.stats.handled += 1

    def stats_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self.stats)
