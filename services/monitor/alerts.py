"""Alert rules over the monitor's figures: which fire, which resolve, which roll a policy back.

`evaluate` is pure: from the rules, what each rule's figure is now in each of its instances, and the alert
book (what fires, since when, silences, recent history), it returns the new book and the transitions. The
service keeps the book in its bucket and writes it by compare-and-set, so of two replicas that see the same
transition one records and sends it: one firing per rule and scope until it resolves, across restarts too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Union

import msgspec

from contracts.events import Alert, AlertResolved
from contracts.policy import AlertRule
from services.monitor.figures import RINGS, WINDOWS
from services.monitor.handlers import Metrics

MAX_HISTORY = 200  # transitions the book keeps for `corral alerts history`
MAX_FIRING = 1000  # alerts firing at once the book keeps (it must fit in one message)
Name = Annotated[str, msgspec.Meta(max_length=512)]


class PolicyChange(msgspec.Struct, frozen=True, kw_only=True):
    """The latest policy change the monitor saw, and what was firing at that moment."""

    version: Annotated[int, msgspec.Meta(ge=0)] = 0
    previous: Annotated[int, msgspec.Meta(ge=0)] = 0
    at: float = 0.0
    firing: Annotated[list[Name], msgspec.Meta(max_length=MAX_FIRING)] = []
    rolled_back: bool = False


class AlertBook(msgspec.Struct, frozen=True, kw_only=True):
    firing: Annotated[dict[Name, Alert], msgspec.Meta(max_length=MAX_FIRING)] = {}
    """`rule|scope` -> the alert as it fired."""
    silences: Annotated[dict[Name, float], msgspec.Meta(max_length=MAX_FIRING)] = {}
    """rule -> Unix seconds until which it neither fires nor sends."""
    history: Annotated[list[Union[Alert, AlertResolved]], msgspec.Meta(max_length=MAX_HISTORY)] = []
    change: PolicyChange = PolicyChange()


class Transitions(msgspec.Struct, kw_only=True):
    fired: list[tuple[AlertRule, Alert]] = []
    resolved: list[AlertResolved] = []


def key(rule: str, scope: str) -> str:
    return f"{rule}|{scope}"


def observe(metrics: Metrics, rule: AlertRule, now: float) -> dict[str, float]:
    """The rule's figure in each instance of its scope (a window with too few tasks tells nothing)."""
    if rule.figure == "breaker_open_s":
        return {f"dependency:{dep}": breaker.open_for(now) for dep, breaker in metrics.breakers.items()}
    if rule.figure == "queue_depth":
        return {f"consumer:{durable}": float(depth) for durable, depth in metrics.queue_depth.items()}
    prefix = {"global": "all", "dependency": "model:"}.get(rule.scope, f"{rule.scope}:")
    names = [n for n in metrics.scopes.names() if n == prefix or (prefix.endswith(":") and n.startswith(prefix))]
    values = {}
    for name in names:
        figures = metrics.window(name, rule.window, now)
        count = figures.steps if rule.figure == "step_error_rate" else figures.tasks
        if rule.figure in ("tokens_per_hour",) or count >= max(1, rule.min_tasks):
            values[name] = _figure(figures, rule.figure)
    return values


def _figure(figures, figure: str) -> float:
    return {"latency_p95_ms": figures.latency.p95_ms, "error_rate": figures.error_rate,
            "step_error_rate": figures.step_error_rate, "tokens_per_hour": figures.tokens_per_hour,
            "cost_per_task_usd": figures.cost_per_task_usd}[figure]


class Pending:
    """Since when each rule and scope has been above its threshold (per replica, in memory: `for`)."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}


def evaluate(book: AlertBook, rules: list[AlertRule], observed: dict[str, dict[str, float]], pending: Pending,
             now: float, policy_version: int) -> tuple[AlertBook, Transitions]:
    firing = dict(book.firing)
    done = Transitions(fired=[], resolved=[])
    at = datetime.fromtimestamp(now, UTC)
    for rule in rules:
        silenced = book.silences.get(rule.name, 0.0) > now
        values = dict(observed.get(rule.name, {}))
        for k, alert in firing.items():  # a firing scope with nothing to show now (an empty window) reads 0
            if alert.rule == rule.name:
                values.setdefault(alert.scope, 0.0)
        for scope, value in values.items():
            k = key(rule.name, scope)
            if k in firing:
                if value <= rule.resolve_threshold:
                    alert = firing.pop(k)
                    done.resolved.append(AlertResolved(rule=rule.name, severity=alert.severity, scope=scope,
                                                       figure=rule.figure, value=value,
                                                       threshold=rule.resolve_threshold,
                                                       started_at=alert.started_at, occurred_at=at))
                continue
            if value <= rule.above:
                pending.since.pop(k, None)
                continue
            since = pending.since.setdefault(k, now)
            if now - since >= rule.for_s and not silenced and len(firing) < MAX_FIRING:
                alert = Alert(rule=rule.name, severity=rule.severity, scope=scope, figure=rule.figure, value=value,
                              threshold=rule.above, window=rule.window, started_at=at, occurred_at=at,
                              policy_version=policy_version,
                              message=f"{rule.figure} {value:.4g} > {rule.above:.4g} over {rule.window} in {scope}")
                firing[k] = alert
                pending.since.pop(k, None)
                done.fired.append((rule, alert))
    _forget_gone(firing, {rule.name for rule in rules}, done)
    if not done.fired and not done.resolved:
        return book, done
    history = [*book.history, *[a for _, a in done.fired], *done.resolved][-MAX_HISTORY:]
    return msgspec.structs.replace(book, firing=firing, history=history), done


def _forget_gone(firing: dict[str, Alert], rules: set[str], done: Transitions) -> None:
    """An alert whose rule the policy no longer has resolves (nothing would ever resolve it)."""
    for k, alert in list(firing.items()):
        if alert.rule not in rules:
            del firing[k]
            done.resolved.append(AlertResolved(rule=alert.rule, severity=alert.severity, scope=alert.scope,
                                               figure=alert.figure, value=alert.value, threshold=alert.threshold,
                                               started_at=alert.started_at))


def should_roll_back(book: AlertBook, rule: AlertRule, alert: Alert, now: float, window_s: float) -> bool:
    """A critical rule that may roll back, firing in a scope that was not firing when the policy last changed,
    within `window_s` of that change (which has not been rolled back already)."""
    change = book.change
    return (rule.auto_rollback and rule.severity == "critical" and change.version > 0 and change.previous > 0
            and not change.rolled_back and 0 <= now - change.at <= window_s
            and key(rule.name, alert.scope) not in change.firing)


def policy_changed(book: AlertBook, version: int, previous: int, now: float) -> AlertBook:
    return msgspec.structs.replace(book, change=PolicyChange(version=version, previous=previous, at=now,
                                                             firing=sorted(book.firing)))


def above_at(metrics: Metrics, rule: AlertRule, at: float, now: float) -> set[str]:
    """`rule|scope` keys that were above the rule's threshold just before `at` (a past moment), as the rebuilt
    figures tell: the window that ended with the last whole bucket before `at`, from what of it the rings
    still hold. Where they hold less than half of it, or the figure has no past (breaker open time, queue
    depth), the scopes above the threshold now count as above then, so they cannot roll anything back."""
    when = now
    if rule.figure not in ("breaker_open_s", "queue_depth"):
        ring, merged = WINDOWS[rule.window]
        slot_s, kept = RINGS[ring]
        first, oldest_kept = int(at // slot_s), int(now // slot_s) - kept + 1
        if 2 * (first - max(first - merged, oldest_kept)) >= merged:
            when = first * slot_s - 1e-6  # the end of the bucket before the one `at` falls in
    return {key(rule.name, scope) for scope, value in observe(metrics, rule, when).items() if value > rule.above}


def missed_change(book: AlertBook, version: int, previous: int, at: float, above: set[str]) -> AlertBook:
    """The book, with a change the monitor did not see happen (it was not running) as its latest: what was
    firing then is what the book still had firing and what was above a threshold at that moment."""
    return msgspec.structs.replace(book, change=PolicyChange(version=version, previous=previous, at=at,
                                                             firing=sorted(set(book.firing) | above)))
