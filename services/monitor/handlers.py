"""monitor: fold every event into live metrics; answer `corral status` from them.

Every figure comes from a time Corral stamped: a task's latency runs from `received_at` (the ingress
stream's timestamp, which the guard carries onward) to its end as the executor stamped it, and the token
window from when this monitor heard each step. A publisher's `occurred_at` counts for nothing.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from contracts import (
    BreakerChanged,
    StepCompleted,
    StepFailed,
    TaskCompleted,
    TaskFailed,
    TaskValidated,
)
from contracts.policy import Policy
from contracts.queries import Percentiles, Savings, StatusReport

LATENCY_WINDOW = 10_000  # most recent tasks the percentiles cover


def percentiles(samples_ms: list[float]) -> Percentiles:
    if not samples_ms:
        return Percentiles()
    ordered = sorted(samples_ms)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return Percentiles(count=len(ordered), p50_ms=at(0.50), p95_ms=at(0.95), p99_ms=at(0.99))


class Metrics:
    def __init__(self, policy: Callable[[], Policy], clock: Any = time.time) -> None:
        self.policy = policy
        self.clock = clock
        self.started = clock()
        self.counts: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.tokens: deque[tuple[float, int]] = deque()  # (when, tokens) within the last hour
        self.cost = 0.0
        self.queue_depth: dict[str, int] = {}
        self.breakers: dict[str, str] = {}
        self.savings = SavingsCount()

    async def on_event(self, event: Any) -> None:
        self.counts[type(event).__struct_config__.tag] += 1
        match event:
            case TaskValidated() if event.shadow_rejection:
                self.counts[f"shadow.{event.shadow_rejection}"] += 1
            case TaskCompleted() | TaskFailed() if event.received_at is not None:  # None: from older services
                self.latencies_ms.append((event.occurred_at - event.received_at).total_seconds() * 1000)
            case StepCompleted():
                self.tokens.append((self.clock(), event.usage.total))
                self.cost += self.policy().price_of(event.model).cost(event.usage)
                self.savings.add(event)
            case BreakerChanged():
                self.breakers[event.dependency] = event.state
            case StepFailed():
                pass

    def report(self) -> StatusReport:
        now = self.clock()
        while self.tokens and self.tokens[0][0] < now - 3600:
            self.tokens.popleft()
        done, failed = self.counts["task.completed"], self.counts["task.failed"]
        steps_ok, steps_failed = self.counts["step.completed"], self.counts["step.failed"]
        return StatusReport(
            counts=dict(self.counts),
            latency=percentiles(list(self.latencies_ms)),
            error_rate=failed / (done + failed) if done + failed else 0.0,
            step_error_rate=steps_failed / (steps_ok + steps_failed) if steps_ok + steps_failed else 0.0,
            tokens_last_hour=sum(tokens for _, tokens in self.tokens),
            cost_usd=round(self.cost, 6),
            cost_per_task_usd=round(self.cost / (done + failed), 6) if done + failed else 0.0,
            queue_depth=dict(self.queue_depth),
            breakers=dict(self.breakers),
            uptime_s=round(now - self.started, 1),
            savings=self.savings.report(),
        )


class SavingsCount:
    """Cache hits, the tokens and dollars they saved, and compaction's tokens before and after."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.tokens = self.compacted = self.before = self.after = 0
        self.cost = 0.0

    def add(self, step: StepCompleted) -> None:
        if step.cache is not None:
            self.hits[step.cache.source] += 1
            self.tokens += max(0, step.cache.saved.total - step.usage.total)
            self.cost += step.cache.cost_avoided_usd
        if step.compaction is not None:
            self.compacted += 1
            self.before += step.compaction.tokens_before
            self.after += step.compaction.tokens_after

    def report(self) -> Savings:
        return Savings(hits=dict(self.hits), tokens_saved=self.tokens, cost_avoided_usd=round(self.cost, 6),
                       compacted_steps=self.compacted, tokens_before_compaction=self.before,
                       tokens_after_compaction=self.after)
