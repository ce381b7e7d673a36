"""Following a KV bucket: every current value, then every change, through server restarts.

nats-py's `KeyValue.watch` is an ordered push consumer kept in the server's memory,
with a 5 s idle heartbeat. The client looks every 10 s (two heartbeats) whether anything
came since it last looked, so it notices a lost consumer 10-20 s after the loss, and
then recreates it from a task of its own that does not try again soon if the server is
not ready yet. A nats-server restart loses every such consumer: with it, a watch would
stay blind for that long after the services reconnected, and a new policy or a
forced-open breaker would reach them only then.

Here the watch is a loop this module owns, on the same kind of consumer (ordered, no
acks, in memory, flow controlled), which it replaces whenever it may be lost:

- the connection came back: at once (TunedClient.on_reconnect wakes it; with another
  client, `nc.stats["reconnects"]` is looked at every HEARTBEAT_S);
- nothing came, not even the server's heartbeat, for SILENT_S: the consumer was
  deleted under it, or the connection is stuck without knowing it;
- a delivery or heartbeat shows a gap in the consumer's sequence (something dropped),
  or the server says it ended the consumer.

The new consumer starts right after the last revision applied, so a change made
while the watch was blind is delivered, not skipped, and nothing is applied twice.
Creating it is retried every RETRY_S until the server's JetStream answers again (not
while the connection is down: nats-py would send the request on reconnect, late).

`apply(key, value, revision)` gets None for a deleted key. A value it cannot decode
(it raises msgspec.DecodeError) is quarantined (shared/quarantine.py) and the watch
goes on; what the view does about that key is the view's choice (it keeps what it knew).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from shared.kv import bucket_name
from shared.quarantine import Quarantine

log = logging.getLogger(__name__)
Apply = Callable[[str, bytes | None, int], None]
HEARTBEAT_S = 1.0
"""How often the server tells a quiet watch that its consumer is alive."""
SILENT_S = 3 * HEARTBEAT_S
"""Three heartbeats missed: the consumer is taken for lost."""
RETRY_S = 0.1
CREATE_TIMEOUT_S = 2.0
INACTIVE_S = 30.0
"""A consumer this process abandoned (unsubscribed, or disconnected) is removed by the server after it."""
_DELETED_MARKERS = ("MaxAge", "Purge", "Remove")  # nats-server 2.11+ markers of a key removed by TTL or purge


class WatchStats(msgspec.Struct):
    """Counts of one watch (its log says the same, as it happens)."""

    applied: int = 0
    restarts: int = 0
    """Consumers replaced (a reconnect, silence or a gap)."""
    failed_starts: int = 0
    """Attempts to create a consumer that the server did not answer (it was still away)."""


class Watch:
    """One followed bucket (or the keys of it that match `keys`)."""

    def __init__(self, kv: KeyValue, apply: Apply, keys: str = ">", quarantine: Quarantine | None = None) -> None:
        # nats-py 2.x keeps these private; it is pinned to 2.x (shared/nats_client.py)
        self.js, self.stream, self.prefix, self.bucket = kv._js, kv._stream, kv._pre, bucket_name(kv)
        self.nc = self.js._nc
        self.apply = apply
        self.keys = keys
        self.quarantine = quarantine or Quarantine()
        self.revision = 0
        """The bucket's stream sequence of the last change applied: a new consumer starts after it."""
        self.stats = WatchStats()
        self._failing = 0  # attempts that failed since a consumer was last made: the first one is told
        self.live = anyio.Event()
        """Set once the first consumer has delivered every value that existed when it started."""

    async def run(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            if not self.nc.is_connected:  # a consumer asked for now would be asked for on reconnect, then dropped
                await _pause(stop)
                continue
            try:
                why = await self._follow(stop)
            except (NatsError, asyncio.TimeoutError) as exc:  # JetStream's errors are NATS errors too
                self.stats.failed_starts += 1
                self._failing += 1
                log.log(logging.WARNING if self._failing == 1 else logging.DEBUG,
                        "watch of %s: the server made no consumer (%r); trying again", self.bucket, exc)
                await _pause(stop)
                continue
            if not stop.is_set():
                self.stats.restarts += 1
                log.info("watch of %s: %s; a new consumer resumes after revision %d", self.bucket, why, self.revision)

    async def _follow(self, stop: anyio.Event) -> str:
        """Create a consumer and apply what it delivers, until `stop` or until it may be lost; says why it ended."""
        feed = _Feed()
        sub = await self.nc.subscribe(self.nc.new_inbox(), cb=feed.arrive)
        forget = _on_reconnect(self.nc, feed.wake.set)
        try:
            reconnects = self.nc.stats["reconnects"]
            info = await self.js.add_consumer(self.stream, self._config(sub.subject), timeout=CREATE_TIMEOUT_S)
            self._failing, feed.pending = 0, info.num_pending or 0
            if feed.caught_up():
                self.live.set()
            return await self._drain(feed, reconnects, stop)
        finally:
            forget()
            with anyio.CancelScope(shield=True):
                await _unsubscribe(sub)

    async def _drain(self, feed: _Feed, reconnects: int, stop: anyio.Event) -> str:
        heard = time.monotonic()
        while not stop.is_set():
            if not feed.arrived:
                if why := await self._idle(feed, reconnects, heard):
                    return why
                continue
            heard = time.monotonic()
            if not await self._take(feed.arrived.popleft(), feed):
                return "its deliveries broke off"
        return "stopped"

    async def _idle(self, feed: _Feed, reconnects: int, heard: float) -> str | None:
        """Wait for a delivery, at most HEARTBEAT_S; why the consumer is taken for lost, if it is."""
        feed.wake.clear()
        with anyio.move_on_after(HEARTBEAT_S):
            await feed.wake.wait()
        if self.nc.stats["reconnects"] != reconnects:
            return "the connection came back"
        if not feed.arrived and time.monotonic() - heard > SILENT_S:
            return f"nothing heard for {SILENT_S:g} s"
        return None

    def _config(self, inbox: str) -> api.ConsumerConfig:
        resume = self.revision > 0
        return api.ConsumerConfig(
            deliver_subject=inbox, filter_subject=f"{self.prefix}{self.keys}",
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if resume else api.DeliverPolicy.LAST_PER_SUBJECT,
            opt_start_seq=self.revision + 1 if resume else None,
            ack_policy=api.AckPolicy.NONE, max_deliver=1, flow_control=True, idle_heartbeat=HEARTBEAT_S,
            mem_storage=True, num_replicas=1, inactive_threshold=INACTIVE_S)

    async def _take(self, msg: Msg, feed: _Feed) -> bool:
        """Handle one delivery; False if the consumer must be replaced (a gap in its sequence, or it ended)."""
        headers = msg.headers or {}
        status = headers.get(api.Header.STATUS)
        if status == "100":  # a heartbeat or a flow-control request, no data
            return await self._control(msg, headers, feed)
        if status is not None:  # the server ended the consumer (409 Consumer Deleted, …)
            log.warning("watch of %s: the server says %s %s", self.bucket, status, headers.get(api.Header.DESCRIPTION))
            return False
        meta = msg.metadata
        if meta.sequence.consumer != feed.consumer + 1:
            log.warning("watch of %s: delivery %d after %d, some were lost", self.bucket, meta.sequence.consumer,
                        feed.consumer)
            return False
        feed.consumer, feed.pending = meta.sequence.consumer, meta.num_pending
        await self._apply(msg.subject[len(self.prefix):], None if _deleted(headers) else msg.data,
                          meta.sequence.stream)
        if feed.caught_up():
            self.live.set()
        return True

    async def _control(self, msg: Msg, headers: dict[str, str], feed: _Feed) -> bool:
        if msg.reply:  # flow control: every message before it was handled, so ask for more
            await self.nc.publish(msg.reply)
            return True
        if stalled := headers.get(api.Header.CONSUMER_STALLED):
            await self.nc.publish(stalled)
        last = headers.get(api.Header.LAST_CONSUMER)
        return last is None or int(last) == feed.consumer

    async def _apply(self, key: str, value: bytes | None, revision: int) -> None:
        try:
            self.apply(key, value, revision)
        except msgspec.DecodeError as exc:
            await self.quarantine.note(self.bucket, key, revision, value or b"", exc)
        self.revision = revision
        self.stats.applied += 1


class _Feed:
    """What one consumer delivered and the watch has not applied yet, and where its deliveries are."""

    def __init__(self) -> None:
        self.arrived: deque[Msg] = deque()
        self.wake = asyncio.Event()
        self.consumer = 0
        """The consumer sequence of the last delivery applied."""
        self.pending = 0
        """Deliveries still to come of what the bucket held when the consumer began (as the last one said)."""

    async def arrive(self, msg: Msg) -> None:
        self.arrived.append(msg)
        self.wake.set()

    def caught_up(self) -> bool:
        return self.pending == 0


async def _pause(stop: anyio.Event) -> None:
    with anyio.move_on_after(RETRY_S):
        await stop.wait()


def _on_reconnect(nc: Any, wake: Callable[[], None]) -> Callable[[], None]:
    listen = getattr(nc, "on_reconnect", None)  # shared.nats_client.TunedClient
    return listen(wake) if listen is not None else (lambda: None)


def _deleted(headers: dict[str, str]) -> bool:
    return headers.get(KV_OP) in (KV_DEL, KV_PURGE) or headers.get("Nats-Marker-Reason") in _DELETED_MARKERS


async def _unsubscribe(sub: Any) -> None:
    try:
        await sub.unsubscribe()
    except NatsError:  # closed or reconnecting: the server forgets the interest anyway
        pass


async def follow_bucket(kv: KeyValue, apply: Apply, stop: anyio.Event, keys: str = ">",
                        quarantine: Quarantine | None = None) -> None:
    """Call `apply(key, value, revision)` for the current value of every key matching `keys`, then
    for every change (value None: deleted), until `stop` is set. How a process keeps a
    read-only view of a bucket."""
    await Watch(kv, apply, keys, quarantine).run(stop)
