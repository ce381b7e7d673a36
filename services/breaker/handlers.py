"""breaker: count consecutive failures per dependency; open, half-open and close its circuit.

closed --N consecutive failures--> open --reset timeout--> half_open --success--> closed
                                     ^                         |
                                     +--------failure----------+
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from contracts import BreakerChanged, StepCompleted, StepFailed, subjects
from contracts.events import BreakerStateName
from contracts.state import BreakerRecord
from contracts.policy import Policy
from shared.kv import TypedBucket

Emit = Callable[[str, Any], Awaitable[None]]
Clock = Callable[[], float]
# A permanent error blames the request, not the dependency: it does not count.
COUNTED_ERRORS = frozenset({"transient", "timeout", "rate_limited"})
Transition = tuple[BreakerStateName, BreakerStateName, int]


def record_outcome(record: BreakerRecord, *, ok: bool, now: float, threshold: int, reset_s: float) -> Transition:
    """Apply one call's outcome; return (previous state, new state, consecutive failures)."""
    previous = record.state
    if ok:
        record.consecutive_failures = 0
        record.state = "closed"
    else:
        record.consecutive_failures += 1
        probing = record.state != "closed"  # a failed probe, or a failure seen while open
        if probing or record.consecutive_failures >= threshold:
            record.state, record.opened_at, record.retry_at = "open", now, now + reset_s
    if record.state != previous:
        record.changed_at = now
    return previous, record.state, record.consecutive_failures


def half_open_if_due(record: BreakerRecord, *, now: float) -> Transition:
    previous = record.state
    if record.state == "open" and now >= record.retry_at:
        record.state, record.changed_at = "half_open", now
    return previous, record.state, record.consecutive_failures


class Breaker:
    def __init__(self, policy: Callable[[], Policy], records: TypedBucket[BreakerRecord], emit: Emit,
                 clock: Clock) -> None:
        self.policy = policy
        self.records = records
        self.emit = emit
        self.clock = clock

    async def on_outcome(self, step: StepCompleted | StepFailed) -> None:
        ok = isinstance(step, StepCompleted)
        if not ok and step.error not in COUNTED_ERRORS:
            return
        rules = self.policy().breakers
        change = partial(record_outcome, ok=ok, now=self.clock(), threshold=rules.minimum_calls,
                         reset_s=rules.wait_in_open_s)
        await self._apply(step.dependency, change)

    async def tick(self, dependencies: list[str]) -> None:
        """Move open circuits whose wait has passed to half-open."""
        for dependency in dependencies:
            await self._apply(dependency, partial(half_open_if_due, now=self.clock()))

    async def _apply(self, dependency: str, change: Callable[[BreakerRecord], Transition]) -> None:
        default = partial(BreakerRecord, dependency=dependency)
        previous, state, failures = await self.records.update(dependency, change, default)
        if state != previous:
            await self.emit(subjects.breaker_state(dependency), BreakerChanged(
                dependency=dependency, previous=previous, state=state, consecutive_failures=failures))
