"""The monitor's figures: per scope, rings of per-interval buckets that merge exactly into sliding windows.

A bucket holds what happened in one interval: task and step counts, tokens, cost and a latency sketch
(DDSketch, 1 % relative accuracy). Buckets of the same interval length add up exactly (counts add, the
sketches' bins add), so a window is the merge of its last buckets and two replicas' figures combine the
same way. A short ring (10 s buckets) serves the 1 min and 5 min windows, a long one (1 min buckets) the
hour. Buckets are placed by the time Corral stamped on the event (the stream's receipt time), so a replay
from the streams rebuilds the same windows a live monitor saw.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from ddsketch import LogCollapsingLowestDenseDDSketch

RELATIVE_ACCURACY = 0.01  # a percentile is within 1 % of the true sample's value
BIN_LIMIT = 2048  # 1.02**2048: far beyond any latency; bounds a sketch's memory all the same
WINDOWS: dict[str, tuple[str, int]] = {"1m": ("short", 6), "5m": ("short", 30), "1h": ("long", 60)}
"""Window -> (ring, buckets merged)."""
RINGS: dict[str, tuple[float, int]] = {"short": (10.0, 30), "long": (60.0, 60)}
"""Ring -> (seconds per bucket, buckets kept)."""
MAX_BINS = BIN_LIMIT

Bins = Annotated[list[float], msgspec.Meta(max_length=MAX_BINS)]


class SketchState(msgspec.Struct, frozen=True, kw_only=True):
    """A sketch as stored in a snapshot: its positive bins from `offset` on, and the zero bucket."""

    offset: int = 0
    bins: Bins = []
    zero: float = 0.0


class Sketch:
    """Latencies in milliseconds; negative values (clock skew) count as zero."""

    __slots__ = ("_sketch",)

    def __init__(self) -> None:
        self._sketch = LogCollapsingLowestDenseDDSketch(RELATIVE_ACCURACY, bin_limit=BIN_LIMIT)

    @property
    def count(self) -> int:
        return int(self._sketch.count)

    def add(self, value_ms: float) -> None:
        self._sketch.add(max(0.0, value_ms))

    def merge(self, other: Sketch) -> None:
        if other.count:
            self._sketch.merge(other._sketch)

    def quantile(self, q: float) -> float:
        value = self._sketch.get_quantile_value(q) if self.count else None
        return round(value, 3) if value is not None and math.isfinite(value) else 0.0

    def state(self) -> SketchState:
        store = self._sketch._store
        return SketchState(offset=store.offset, bins=list(store.bins), zero=self._sketch._zero_count)

    @classmethod
    def from_state(cls, state: SketchState) -> Sketch:
        sketch = cls()
        for index, weight in enumerate(state.bins):
            if weight:
                sketch._sketch._store.add(state.offset + index, weight)
        sketch._sketch._zero_count = state.zero
        sketch._sketch._count = sketch._sketch._store.count + state.zero
        return sketch


class Bucket:
    """What one scope saw in one interval (or, merged, in a window)."""

    __slots__ = ("tasks_ok", "tasks_failed", "steps_ok", "steps_failed", "tokens", "cost", "latency")

    def __init__(self) -> None:
        self.tasks_ok = self.tasks_failed = self.steps_ok = self.steps_failed = self.tokens = 0
        self.cost = 0.0
        self.latency = Sketch()

    def merge(self, other: Bucket) -> None:
        self.tasks_ok += other.tasks_ok
        self.tasks_failed += other.tasks_failed
        self.steps_ok += other.steps_ok
        self.steps_failed += other.steps_failed
        self.tokens += other.tokens
        self.cost += other.cost
        self.latency.merge(other.latency)

    def state(self) -> BucketState:
        return BucketState(tasks_ok=self.tasks_ok, tasks_failed=self.tasks_failed, steps_ok=self.steps_ok,
                           steps_failed=self.steps_failed, tokens=self.tokens, cost=self.cost,
                           latency=self.latency.state())

    @classmethod
    def from_state(cls, state: BucketState) -> Bucket:
        bucket = cls()
        bucket.tasks_ok, bucket.tasks_failed = state.tasks_ok, state.tasks_failed
        bucket.steps_ok, bucket.steps_failed = state.steps_ok, state.steps_failed
        bucket.tokens, bucket.cost = state.tokens, state.cost
        bucket.latency = Sketch.from_state(state.latency)
        return bucket


Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class BucketState(msgspec.Struct, frozen=True, kw_only=True):
    tasks_ok: Count = 0
    tasks_failed: Count = 0
    steps_ok: Count = 0
    steps_failed: Count = 0
    tokens: Count = 0
    cost: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    latency: SketchState = SketchState()


class Ring:
    """The last `slots` buckets of `slot_s` seconds each, by interval number.

    A window's closed buckets (all but the newest) are merged once and kept until the window moves on or
    an event lands in one of them (a late event, a replay); a report then merges only the newest bucket in.
    """

    __slots__ = ("slot_s", "slots", "buckets", "_closed")

    def __init__(self, slot_s: float, slots: int) -> None:
        self.slot_s = slot_s
        self.slots = slots
        self.buckets: dict[int, Bucket] = {}
        self._closed: dict[int, tuple[int, Bucket]] = {}  # window slots -> (its newest index, closed merge)

    def at(self, when: float) -> Bucket:
        index = int(when // self.slot_s)
        if self._closed and any(index < newest for newest, _ in self._closed.values()):
            self._closed.clear()
        bucket = self.buckets.get(index)
        if bucket is None:
            bucket = self.buckets[index] = Bucket()
            self.expire(index)
        return bucket

    def expire(self, newest: int) -> None:
        for index in [i for i in self.buckets if i <= newest - self.slots]:
            del self.buckets[index]

    def window(self, now: float, slots: int) -> Bucket:
        newest = int(now // self.slot_s)
        cached = self._closed.get(slots)
        if cached is None or cached[0] != newest:
            closed = Bucket()
            for index, bucket in self.buckets.items():
                if newest - slots < index < newest:
                    closed.merge(bucket)
            cached = self._closed[slots] = (newest, closed)
        merged = Bucket()
        merged.merge(cached[1])
        if (current := self.buckets.get(newest)) is not None:
            merged.merge(current)
        return merged


class ScopeFigures:
    """One scope's rings: what `all`, one tenant, one agent kind or one model saw."""

    __slots__ = ("rings",)

    def __init__(self) -> None:
        self.rings = {name: Ring(slot_s, slots) for name, (slot_s, slots) in RINGS.items()}

    def buckets_at(self, when: float) -> list[Bucket]:
        return [ring.at(when) for ring in self.rings.values()]

    def window(self, now: float, window: str) -> Bucket:
        ring, slots = WINDOWS[window]
        return self.rings[ring].window(now, slots)


class Scopes:
    """Scopes by name (`all`, `tenant:x`, `agent:y`, `model:z`), at most `limit` of them: a new tenant,
    agent or model past the limit is counted in `tenant:other` (`agent:other`, `model:other`), so
    publishers naming ever new tenants cannot grow the monitor's memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_name: dict[str, ScopeFigures] = {"all": ScopeFigures()}

    def get(self, kind: str, name: str) -> ScopeFigures:
        key = f"{kind}:{name}"
        scope = self.by_name.get(key)
        if scope is None:
            if len(self.by_name) >= self.limit:
                key = f"{kind}:other"
                scope = self.by_name.get(key)
            if scope is None:
                scope = self.by_name[key] = ScopeFigures()
        return scope

    def names(self) -> list[str]:
        return list(self.by_name)
