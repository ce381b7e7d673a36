"""monitor: fold every event into windowed figures; answer `corral status` from them.

Every figure comes from a time Corral stamped: each event counts at its stream's receipt time (`at`,
given by the service from the message's JetStream metadata), and a task's latency runs from `received_at`
(the ingress stream's timestamp, which the guard carries onward) to the receipt of its end on the tasks
stream. A publisher's `occurred_at` counts for nothing.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from contracts import (
    BreakerChanged,
    TaskAdmitted,
    StepCompleted,
    StepFailed,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TaskValidated,
)
from contracts.policy import Policy
from contracts.queries import BreakerTime, Percentiles, Savings, ScopeReport, StatusReport, WindowFigures
from services.monitor.figures import RINGS, WINDOWS, Bucket, Scopes, Sketch

MAX_SCOPES = 256  # tenants + agent kinds + models with figures of their own; the rest fold into `<kind>:other`
MAX_OPEN_TASKS = 100_000  # tasks whose agent kind is remembered between validation and end


def percentiles(samples_ms: list[float]) -> Percentiles:
    """Percentiles of a list of samples, through the same sketch the monitor keeps (1 % relative accuracy)."""
    sketch = Sketch()
    for sample in samples_ms:
        sketch.add(sample)
    return sketch_percentiles(sketch)


def sketch_percentiles(sketch: Sketch) -> Percentiles:
    if not sketch.count:
        return Percentiles()
    return Percentiles(count=sketch.count, p50_ms=sketch.quantile(0.50), p95_ms=sketch.quantile(0.95),
                       p99_ms=sketch.quantile(0.99))


class Breaker:
    """One dependency's circuit as the breaker events tell it; times are stream receipt times."""

    __slots__ = ("state", "opened_at", "open_total_s")

    def __init__(self) -> None:
        self.state = "closed"
        self.opened_at: float | None = None
        self.open_total_s = 0.0

    def change(self, state: str, at: float) -> None:
        if state == "closed" and self.opened_at is not None:
            self.open_total_s += max(0.0, at - self.opened_at)
            self.opened_at = None
        elif state != "closed" and self.opened_at is None:
            self.opened_at = at
        self.state = state

    def open_for(self, now: float) -> float:
        return max(0.0, now - self.opened_at) if self.opened_at is not None else 0.0


class Metrics:
    def __init__(self, policy: Callable[[], Policy], clock: Any = time.time, max_scopes: int = MAX_SCOPES) -> None:
        self.policy = policy
        self.clock = clock
        self.started = clock()
        self.counts: Counter[str] = Counter()
        self.cost = 0.0
        self.scopes = Scopes(max_scopes)
        self.agents: OrderedDict[str, str] = OrderedDict()  # task_ref -> agent kind, until the task ends
        self.reserved: OrderedDict[str, tuple[str, int]] = OrderedDict()  # task_ref -> (tenant, tokens held)
        self.queue_depth: dict[str, int] = {}
        self.breakers: dict[str, Breaker] = {}
        self.positions: dict[str, int] = {}  # stream -> last sequence folded in
        self.replica = ""
        self.savings = SavingsCount()

    async def on_event(self, event: Any, at: float, stream: str = "", seq: int = 0) -> None:
        """Fold one event in; `at`: its stream receipt time (Unix seconds), `seq` its sequence in `stream`."""
        self.fold(event, at)
        if stream:
            self.positions[stream] = max(seq, self.positions.get(stream, 0))

    def fold(self, event: Any, at: float) -> None:
        self.counts[type(event).__struct_config__.tag] += 1
        match event:
            case TaskValidated():
                self._remember_agent(event.task_ref, event.spec.agent)
                if event.shadow_rejection:
                    self.counts[f"shadow.{event.shadow_rejection}"] += 1
            case TaskAdmitted():
                self.reserved[event.task_ref] = (event.tenant, event.reserved_tokens)
                if len(self.reserved) > MAX_OPEN_TASKS:
                    self.reserved.popitem(last=False)
            case TaskCompleted() | TaskFailed():
                self.reserved.pop(event.task_ref, None)
                self._task_ended(event, at)
            case TaskRejected():  # the budget refused it after the guard let it through: it never runs
                self.agents.pop(event.task_ref, None)
            case StepCompleted():
                cost = self.policy().price_of(event.model).cost(event.usage)
                self.cost += cost
                for bucket in self._buckets(at, event.tenant, event.agent, event.model):
                    bucket.steps_ok += 1
                    bucket.tokens += event.usage.total
                    bucket.cost += cost
                self.savings.add(event)
            case StepFailed():
                for bucket in self._buckets(at, event.tenant, event.agent, _model_of(event.dependency)):
                    bucket.steps_failed += 1
            case BreakerChanged():
                self.breakers.setdefault(event.dependency, Breaker()).change(event.state, at)

    def _task_ended(self, event: TaskCompleted | TaskFailed, at: float) -> None:
        agent = self.agents.pop(event.task_ref, "")
        model = event.model if isinstance(event, TaskCompleted) else ""
        latency_ms = (at - event.received_at.timestamp()) * 1000 if event.received_at is not None else None
        for bucket in self._buckets(at, event.tenant, agent, model):
            if isinstance(event, TaskCompleted):
                bucket.tasks_ok += 1
            else:
                bucket.tasks_failed += 1
            if latency_ms is not None:  # None: from an older guard, which stamped no receipt
                bucket.latency.add(latency_ms)

    def _remember_agent(self, ref: str, agent: str) -> None:
        self.agents[ref] = agent
        if len(self.agents) > MAX_OPEN_TASKS:
            self.agents.popitem(last=False)

    def _buckets(self, at: float, tenant: str, agent: str, model: str) -> list[Bucket]:
        scopes = [self.scopes.by_name["all"], self.scopes.get("tenant", tenant)]
        if agent:
            scopes.append(self.scopes.get("agent", agent))
        if model:
            scopes.append(self.scopes.get("model", model))
        return [bucket for scope in scopes for bucket in scope.buckets_at(at)]

    def reserved_by_tenant(self) -> dict[str, int]:
        """Tokens admitted tasks hold and have not ended yet, by tenant (as the budget reserved them)."""
        held: Counter[str] = Counter()
        for tenant, tokens in self.reserved.values():
            held[tenant] += tokens
        return dict(held)

    def window(self, scope: str, window: str, now: float | None = None) -> WindowFigures:
        figures = self.scopes.by_name.get(scope)
        bucket = figures.window(self.clock() if now is None else now, window) if figures else Bucket()
        return window_figures(bucket, WINDOWS[window])

    def report(self) -> StatusReport:
        now = self.clock()
        scopes = [ScopeReport(scope=name, windows={w: self.window(name, w, now) for w in WINDOWS})
                  for name in self.scopes.names()]
        hour = scopes[0].windows["1h"]
        done, failed = self.counts["task.completed"], self.counts["task.failed"]
        steps_ok, steps_failed = self.counts["step.completed"], self.counts["step.failed"]
        return StatusReport(
            counts=dict(self.counts),
            latency=hour.latency,
            error_rate=_rate(failed, done + failed),
            step_error_rate=_rate(steps_failed, steps_ok + steps_failed),
            tokens_last_hour=hour.tokens,
            cost_usd=round(self.cost, 6),
            cost_per_task_usd=round(self.cost / (done + failed), 6) if done + failed else 0.0,
            queue_depth=dict(self.queue_depth),
            breakers={dependency: breaker.state for dependency, breaker in self.breakers.items()},
            uptime_s=round(now - self.started, 1),
            scopes=scopes,
            breaker_times=[BreakerTime(dependency=dependency, state=b.state, open_for_s=round(b.open_for(now), 3),
                                       open_total_s=round(b.open_total_s + b.open_for(now), 3))
                           for dependency, b in self.breakers.items()],
            positions=dict(self.positions),
            replica=self.replica,
            reserved_tokens=self.reserved_by_tenant(),
            savings=self.savings.report(),
        )


def window_figures(bucket: Bucket, window: tuple[str, int]) -> WindowFigures:
    ring, slots = window
    seconds = RINGS[ring][0] * slots
    tasks = bucket.tasks_ok + bucket.tasks_failed
    steps = bucket.steps_ok + bucket.steps_failed
    return WindowFigures(
        latency=sketch_percentiles(bucket.latency), tasks=tasks, error_rate=_rate(bucket.tasks_failed, tasks),
        steps=steps, step_error_rate=_rate(bucket.steps_failed, steps), tokens=bucket.tokens,
        tokens_per_hour=round(bucket.tokens * 3600 / seconds, 3), cost_usd=round(bucket.cost, 6),
        cost_per_task_usd=round(bucket.cost / tasks, 6) if tasks else 0.0)


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _model_of(dependency: str) -> str:
    """The model of a `provider/model` dependency; '' for a tool (`tool/NAME`)."""
    provider, _, model = dependency.partition("/")
    return model if model and provider != "tool" else ""


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

    def restore(self, saved: Savings) -> None:
        self.hits.update(saved.hits)
        self.tokens, self.cost, self.compacted = saved.tokens_saved, saved.cost_avoided_usd, saved.compacted_steps
        self.before, self.after = saved.tokens_before_compaction, saved.tokens_after_compaction

    def report(self) -> Savings:
        return Savings(hits=dict(self.hits), tokens_saved=self.tokens, cost_avoided_usd=round(self.cost, 6),
                       compacted_steps=self.compacted, tokens_before_compaction=self.before,
                       tokens_after_compaction=self.after)
