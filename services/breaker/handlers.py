"""breaker: turn every call's outcome into circuit state per dependency; grant half-open probes; obey operators.

The breaker service alone writes the `corral_breakers` bucket: each change is a
compare-and-set of one dependency's record (services/breaker/circuit.py decides
what changes), so any number of breaker replicas may run. Executor and worker
replicas watch the bucket; in half-open they ask here for a probe lease
(request/reply), and the lease is part of the same record, so "only N probes
across every replica" is one CAS, not a count each replica keeps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar


from contracts import BreakerChanged, Call, StepCompleted, StepFailed, subjects
from contracts.commands import AcquireProbe, ControlBreaker
from contracts.policy import Policy
from contracts.queries import BreakerReply, ProbeGrant
from contracts.state import BreakerRecord
from services.breaker import circuit
from shared.kv import TypedBucket

Emit = Callable[[str, Any], Awaitable[None]]
Clock = Callable[[], float]
R = TypeVar("R")
# A permanent error blames the request, not the dependency: it is not counted (resilience4j's ignored exceptions).
COUNTED_ERRORS = frozenset({"transient", "timeout", "rate_limited"})


def calls_of(step: StepCompleted | StepFailed) -> list[Call]:
    """The calls a step outcome reports; an older worker's outcome is one call to its `dependency`."""
    if step.calls is not None:
        return step.calls
    if isinstance(step, StepCompleted):
        return [Call(dependency=step.dependency, latency_ms=step.latency_ms)]
    return [] if step.breaker_open else [Call(dependency=step.dependency, error=step.error)]


class Breaker:
    def __init__(self, policy: Callable[[], Policy], records: TypedBucket[BreakerRecord], emit: Emit,
                 clock: Clock) -> None:
        self.policy = policy
        self.records = records
        self.emit = emit
        self.clock = clock

    async def on_outcome(self, step: StepCompleted | StepFailed) -> None:
        for call in calls_of(step):
            if call.error is not None and call.error not in COUNTED_ERRORS:
                continue
            await self._apply(call.dependency, partial(
                circuit.record_call, failed=call.error is not None, latency_s=call.latency_ms / 1000,
                call_id=step.step_id, rules=self.policy().breaker_for(call.dependency), now=self.clock(),
                started_at=call.started_at))

    async def acquire_probe(self, request: AcquireProbe) -> ProbeGrant:
        granted, record = await self._apply(request.dependency, partial(
            circuit.grant_probe, call_id=request.call_id, holder=request.holder,
            rules=self.policy().breaker_for(request.dependency), now=self.clock()))
        return ProbeGrant(granted=granted, state=record.state, reason=record.reason)

    async def control(self, command: ControlBreaker) -> BreakerReply:
        _, record = await self._apply(command.dependency, partial(
            circuit.force, action=command.action, operator=command.operator, now=self.clock()))
        return BreakerReply(dependency=command.dependency, state=record.state, forced=record.forced,
                            reason=record.reason)

    async def tick(self, records: list[BreakerRecord]) -> None:
        """Move open circuits whose wait has passed to half-open; free expired probe leases."""
        now = self.clock()
        for record in records:
            rules = self.policy().breaker_for(record.dependency)
            if record.state == "open" and not record.forced and now >= record.retry_at:
                await self._apply(record.dependency, partial(circuit.half_open_if_due, rules=rules, now=now))
            elif any(lease.expires_at <= now for lease in record.leases):
                await self._apply(record.dependency, partial(circuit.expire_leases, now=now))

    async def _apply(self, dependency: str, change: Callable[[BreakerRecord], R]) -> tuple[R, BreakerRecord]:
        """Change one record with compare-and-set; announce the transition if there was one."""

        def changed(record: BreakerRecord) -> tuple[R, BreakerRecord, BreakerChanged | None]:
            previous, generation = record.state, record.generation
            result = change(record)
            event = None if record.generation == generation else BreakerChanged(
                dependency=dependency, previous=previous, state=record.state,
                consecutive_failures=record.consecutive_failures, failure_rate=record.failure_rate,
                slow_call_rate=record.slow_call_rate, calls=record.calls, forced=record.forced,
                reason=record.reason, generation=record.generation, cause_at=record.cause_at)
            return result, record, event

        # Concurrent outcomes of one dependency are applied in order and written at once (the bucket's
        # group commit), so conflicts come only from other replicas.
        result, record, event = await self.records.update(dependency, changed,
                                                          partial(BreakerRecord, dependency=dependency))
        if event is not None:
            await self.emit(subjects.breaker_state(dependency), event)
        return result, record
