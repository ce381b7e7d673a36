"""Observing events as they are published, for a service whose state is only a summary (the monitor).

A plain NATS subscription to the streams' subjects: the server hands each event to
the observer as it stores it, with no consumer, fetch or ack behind it. That is about
half of what a JetStream delivery costs both sides, and it is the right price for
metrics: what is missed while the observer is down is missed, as its in-memory
figures are lost with it anyway. Anything that must see every event uses a Consumer.
Replicas share the events (one queue group), as they would share a durable.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from nats.aio.msg import Msg

from shared import tracing
from shared.bus import Bus

log = logging.getLogger(__name__)
T = TypeVar("T")
PENDING_MSGS = 1_000_000  # what may wait in this process before the server drops (slow consumer)


class ObserverStats(msgspec.Struct):
    handled: int = 0
    undecodable: int = 0
    errors: int = 0


class Observer(Generic[T]):
    def __init__(self, bus: Bus, name: str, subjects: Sequence[str], decode: Callable[[bytes], T],
                 handler: Callable[[T], Awaitable[None]]) -> None:
        self.bus = bus
        self.name = name
        self.subjects = subjects
        self.decode = decode
        self.handler = handler
        self.stats = ObserverStats()
        self.subscribed = anyio.Event()  # set once the subscriptions are sent: what is published after, is seen

    async def run(self, stop: anyio.Event) -> None:
        queue = f"{self.bus.service}-{self.name}"
        subs = [await self.bus.nc.subscribe(subject, queue=queue, cb=self._on_msg, pending_msgs_limit=PENDING_MSGS)
                for subject in self.subjects]
        self.subscribed.set()
        try:
            await stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                for sub in subs:
                    await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = self.decode(msg.data)
        except Exception as exc:  # noqa: BLE001 - a RecursionError too: the message's own consumers dead-letter it;
            # here it is only not counted.
            self.stats.undecodable += 1
            log.warning("%s: not counting an undecodable message on %s: %s", self.name, msg.subject, exc)
            return
        attributes = {"messaging.system": "nats", "messaging.destination.name": msg.subject,
                      "corral.task_id": getattr(event, "task_id", "")}
        try:
            with tracing.consuming(f"{self.bus.service} {self.name}", msg.headers, attributes):
                await self.handler(event)
        except Exception:  # one bad event must not stop the observing
            self.stats.errors += 1
            log.exception("%s: handler failed for a message on %s", self.name, msg.subject)
            return
        self.stats.handled += 1

    def stats_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self.stats)
