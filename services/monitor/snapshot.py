"""The monitor's snapshots: its figures and the stream positions they cover, in its own bucket.

A snapshot is one generation of keys `snap.<writer>.<n>.<i>`: one per scope (a scope's rings fit in a
message where the whole would not) and one per OPEN_PER_KEY open tasks; then `head`, naming the
generation's keys and the positions. `head` is written last, so a reader never sees a generation half
written; the writer then deletes its previous generation. Replicas write the same `head` (whichever wrote
last wins): each generation is complete on its own and every replica folds the same events, so either
one's is valid. A value that does not decode, or a generation whose keys are gone, is quarantined (or
logged) and the monitor rebuilds from the streams.
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Any, Union

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from contracts.queries import Savings
from services.monitor.figures import Bucket, BucketState, Ring, ScopeFigures
from services.monitor.handlers import Breaker, Metrics
from shared.quarantine import Quarantine

log = logging.getLogger(__name__)
HEAD = "head"
SNAPSHOT_VERSION = 1
MAX_KEYS = 4096
OPEN_PER_KEY = 5000  # open tasks per key: well within a message
Name = Annotated[str, msgspec.Meta(max_length=256)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class RingState(msgspec.Struct, frozen=True, kw_only=True):
    buckets: Annotated[dict[int, BucketState], msgspec.Meta(max_length=1024)] = {}


class ScopeState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="scope"):
    scope: Name
    rings: Annotated[dict[str, RingState], msgspec.Meta(max_length=8)] = {}


class BreakerState(msgspec.Struct, frozen=True, kw_only=True):
    state: Name = "closed"
    opened_at: float | None = None
    open_total_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class Reservation(msgspec.Struct, frozen=True, array_like=True):
    tenant: Name
    tokens: Count


class OpenTasks(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="open"):
    """Up to OPEN_PER_KEY tasks between validation or admission and their end: their agent kinds and
    reservations (a key of its own each, so that many open tasks still fit in messages)."""

    agents: Annotated[dict[Name, Name], msgspec.Meta(max_length=OPEN_PER_KEY)] = {}
    reserved: Annotated[dict[Name, Reservation], msgspec.Meta(max_length=OPEN_PER_KEY)] = {}


Part = Union[ScopeState, OpenTasks]


class Head(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    version: Annotated[int, msgspec.Meta(ge=1, le=SNAPSHOT_VERSION)] = SNAPSHOT_VERSION
    generation: Name
    keys: Annotated[list[Name], msgspec.Meta(max_length=MAX_KEYS)]
    positions: Annotated[dict[Name, Count], msgspec.Meta(max_length=16)]
    counts: Annotated[dict[Name, Count], msgspec.Meta(max_length=MAX_KEYS)] = {}
    cost: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    breakers: Annotated[dict[Name, BreakerState], msgspec.Meta(max_length=MAX_KEYS)] = {}
    taken_at: float = 0.0
    savings: Savings = Savings()


_encode = msgspec.msgpack.Encoder().encode
_decode_head = msgspec.msgpack.Decoder(Head).decode
_decode_part = msgspec.msgpack.Decoder(Part).decode


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What one capture holds, before it is written (or after it is read)."""

    head: Head
    parts: list[Part]


def capture(metrics: Metrics, generation: str, now: float) -> Snapshot:
    """The figures as they are now, synchronously (no event is folded in while it runs)."""
    scopes = [ScopeState(scope=name, rings={ring_name: _ring_state(ring, now) for ring_name, ring in
                                            figures.rings.items()})
              for name, figures in metrics.scopes.by_name.items()]
    parts: list[Part] = [*scopes, *_open_tasks(metrics)]
    keys = [f"snap.{generation}.{index}" for index in range(len(parts))]
    head = Head(generation=generation, keys=keys, positions=dict(metrics.positions), counts=dict(metrics.counts),
                cost=metrics.cost, taken_at=now, savings=metrics.savings.report(),
                breakers={dependency: BreakerState(state=b.state, opened_at=b.opened_at, open_total_s=b.open_total_s)
                          for dependency, b in metrics.breakers.items()})
    return Snapshot(head=head, parts=parts)


def _open_tasks(metrics: Metrics) -> list[OpenTasks]:
    agents, reserved = list(metrics.agents.items()), list(metrics.reserved.items())
    return [OpenTasks(agents=dict(agents[start:start + OPEN_PER_KEY]),
                      reserved={ref: Reservation(tenant, tokens)
                                for ref, (tenant, tokens) in reserved[start:start + OPEN_PER_KEY]})
            for start in range(0, max(len(agents), len(reserved)), OPEN_PER_KEY)]


def _ring_state(ring: Ring, now: float) -> RingState:
    oldest = int(now // ring.slot_s) - ring.slots
    return RingState(buckets={index: bucket.state() for index, bucket in ring.buckets.items() if index > oldest})


def restore(metrics: Metrics, snapshot: Snapshot) -> None:
    head = snapshot.head
    metrics.positions = dict(head.positions)
    metrics.counts.update(head.counts)
    metrics.cost = head.cost
    metrics.savings.restore(head.savings)
    for dependency, state in head.breakers.items():
        breaker = metrics.breakers[dependency] = Breaker()
        breaker.state, breaker.opened_at, breaker.open_total_s = state.state, state.opened_at, state.open_total_s
    for part in snapshot.parts:
        if isinstance(part, OpenTasks):
            metrics.agents.update(part.agents)
            metrics.reserved.update({ref: (held.tenant, held.tokens) for ref, held in part.reserved.items()})
        else:
            _restore_scope(metrics, part)


def _restore_scope(metrics: Metrics, scope: ScopeState) -> None:
    figures = metrics.scopes.by_name.setdefault(scope.scope, ScopeFigures())
    for ring_name, ring_state in scope.rings.items():
        ring = figures.rings.get(ring_name)
        if ring is not None:
            ring.buckets.update({index: Bucket.from_state(state) for index, state in ring_state.buckets.items()})


class SnapshotStore:
    """Writes this replica's generations to the bucket and reads the newest one back."""

    def __init__(self, kv: KeyValue, bucket: str, quarantine: Quarantine) -> None:
        self.kv = kv
        self.bucket = bucket
        self.quarantine = quarantine
        self.writer = secrets.token_hex(4)
        self.written = 0
        self._previous: list[str] = []
        self.restored_from = ""
        self.refused = ""

    async def write(self, snapshot: Snapshot) -> None:
        for key, part in zip(snapshot.head.keys, snapshot.parts, strict=True):
            await self.kv.put(key, _encode(part))
        await self.kv.put(HEAD, _encode(snapshot.head))
        for key in self._previous:
            try:
                await self.kv.purge(key)
            except Exception:  # noqa: BLE001 - left over; harmless, named by no head
                log.warning("could not purge the old snapshot key %s", key)
        self._previous = list(snapshot.head.keys)
        self.written += 1

    def generation(self) -> str:
        return f"{self.writer}.{self.written}"

    async def read(self) -> Snapshot | None:
        """The newest snapshot; None when there is none, or it is unreadable (quarantined: rebuild)."""
        head_entry = await self._entry(HEAD)
        if head_entry is None:
            return None
        head = await self._decoded(head_entry, _decode_head)
        if head is None:
            return None
        parts = []
        for key in head.keys:
            entry = await self._entry(key)
            if entry is None:
                self.refused = f"snapshot {head.generation}: key {key} is missing"
                log.warning("%s: rebuilding from the streams", self.refused)
                return None
            part = await self._decoded(entry, _decode_part)
            if part is None:
                return None
            parts.append(part)
        self.restored_from = head.generation
        return Snapshot(head=head, parts=parts)

    async def _entry(self, key: str) -> Any:
        try:
            return await self.kv.get(key)
        except KeyNotFoundError:
            return None

    async def _decoded(self, entry: Any, decode: Any) -> Any:
        try:
            return decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            self.refused = f"{entry.key} revision {entry.revision}: {exc}"
            await self.quarantine.note(self.bucket, entry.key, entry.revision or 0, entry.value, exc)
            log.error("the monitor's snapshot does not decode (%s): rebuilding from the streams", exc)
            return None

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "restored_from": self.restored_from, "refused": self.refused}
