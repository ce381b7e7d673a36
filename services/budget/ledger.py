"""The ledger: what the budget keeps, and the pure functions that change it (no I/O).

Two kinds of record live in the budget's KV bucket:

- an **Account** per user and one per tenant: the current UTC day and hour (tokens
  used, cost, thresholds crossed) and the **holds** of the tasks that reserved
  tokens in it. One value holds both windows, so one compare-and-set checks and
  changes both at once.
- a **TaskJournal** per task: the decision (admitted or rejected), every step
  posted with its usage and cost, and how the task ended. It is what `corral cost`
  shows and what keeps a step from being billed twice once the task's hold is gone.
  While the task runs, its steps' costs wait in its hold in the user's account: the
  release copies them into the journal in one write, not one write per step.

An account stays small: a hold exists only while its task runs (plus the moment it
takes to copy its steps into the journal), and windows are replaced when the hour
or day turns. The trade: a user's account carries the costs of their running tasks'
steps (about 200 bytes each), so a user with many long, many-step tasks at once has
a larger value to rewrite; in exchange a step costs one write less.

    reserve(task, estimate)  at admission: only if used + reserved + estimate <= limit, for every window
    extend(task, part, n)    while it runs, once per part of a plan that needs more: the same test, for n
    post(task, step, tokens) once per step id: used += tokens; the hold shrinks; the step id (and, in the
                             user's account, its cost) is kept in it
    close(task)              at the end (or on expiry): the hold reserves nothing more
    settle(task, journaled)  the closed hold goes, once the journal lists every step it posted
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal

import msgspec

from contracts import TaskRejected
from contracts.events import BudgetWindow
from contracts.policy import BudgetLimits
from contracts.queries import StepCost

WINDOWS: tuple[BudgetWindow, ...] = ("day", "hour")
THRESHOLDS = (50, 80, 100)
"""Percent of a window's limit at which the user is notified, once each per window."""


# --- records -------------------------------------------------------------------


class Window(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One UTC calendar window of an account."""

    start: str = ""
    """"2026-11-27" (day) or "2026-11-27T13" (hour)."""
    used: int = 0
    cost_usd: float = 0.0
    crossed: dict[int, str] = {}
    """Threshold percent -> the task whose step crossed it."""
    notified: list[int] = []
    """Thresholds whose CostNotice was published (the rest of `crossed` is still due)."""


class Hold(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A task's reservation in one account."""

    reserved: int
    """Tokens still held: the estimate less what the task's steps used."""
    since: float
    """Unix seconds when it was made, for expiry."""
    steps: dict[str, int] = {}
    """Step ids posted to this account for the task -> tokens beyond the reservation."""
    closed: bool = False
    """The task ended (or the hold expired): it holds nothing, and stays only until
    the task's journal lists all of `steps`."""
    costs: list[StepCost] = []
    """In the user's account: each posted step as the journal will list it, until the journal does."""
    extensions: dict[str, int] = {}
    """Parts of the task (subtask ids, `synthesis`) that reserved more while it ran -> tokens each added."""
    waiting: bool = False
    """The task waits for a person's approval: the hold does not expire meanwhile (services/budget/waits.py)."""

    @property
    def posted_tokens(self) -> int:
        return sum(cost.usage.total for cost in self.costs)


class Account(msgspec.Struct, kw_only=True):
    day: Window = msgspec.field(default_factory=Window)
    hour: Window = msgspec.field(default_factory=Window)
    holds: dict[str, Hold] = {}

    def window(self, name: BudgetWindow) -> Window:
        return self.day if name == "day" else self.hour

    @property
    def reserved(self) -> int:
        return sum(hold.reserved for hold in self.holds.values() if not hold.closed)

    def remaining(self, name: BudgetWindow, limits: BudgetLimits) -> int:
        return limit_of(limits, name) - self.window(name).used - self.reserved

    @property
    def open_holds(self) -> int:
        return sum(1 for hold in self.holds.values() if not hold.closed)


JournalStatus = Literal["admitted", "rejected", "finished", "expired"]


class TaskJournal(msgspec.Struct, kw_only=True):
    """Everything the budget knows about one task; created once, at its admission decision."""

    task_id: str
    tenant: str
    user: str
    status: JournalStatus
    reserved_tokens: int = 0
    decided_at: datetime
    rejection: TaskRejected | None = None
    """The rejection as published, to publish it again (identically) on redelivery."""
    steps: list[StepCost] = []
    expected_tokens: int | None = None
    """Tokens the task's end event reported; the task's CostNotice waits until its steps add up."""
    notified: bool = False
    """The task's CostNotice is published."""

    @property
    def tokens(self) -> int:
        return sum(step.usage.total for step in self.steps)

    @property
    def cost_usd(self) -> float:
        return sum(step.cost_usd for step in self.steps)

    def step_ids(self) -> set[str]:
        return {step.step_id for step in self.steps}

    def add_steps(self, costs: list[StepCost]) -> None:
        """List the steps it does not list yet (a step is listed once, whoever copies it)."""
        listed = self.step_ids()
        self.steps.extend(cost for cost in costs if cost.step_id not in listed)

    @property
    def ended(self) -> bool:
        return self.status in ("finished", "expired") and self.expected_tokens is not None

    def notice_due(self) -> bool:
        return self.ended and not self.notified and self.tokens >= (self.expected_tokens or 0)


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """Why a reservation did not fit: the first window (user before tenant, day before hour) that refused it."""

    scope: Literal["user", "tenant"]
    window: BudgetWindow | Literal["task", "ended"]
    """The window that refused; `task`: the per-task cap; `ended`: the task holds nothing any more."""
    limit: int
    remaining: int
    resets_at: datetime | None


class Posted(msgspec.Struct, frozen=True, kw_only=True):
    """What posting a step did: None from `post` if the step was posted already."""

    over_reservation: int


# --- windows ---------------------------------------------------------------------


def window_start(name: BudgetWindow, now: datetime) -> str:
    return _window_start(name, int(now.timestamp()) // 3600)


@lru_cache(maxsize=64)
def _window_start(name: BudgetWindow, hour: int) -> str:
    """Formatting a date costs more than the rest of a posting: once per window and hour."""
    at = datetime.fromtimestamp(hour * 3600, UTC)
    return at.strftime("%Y-%m-%d") if name == "day" else at.strftime("%Y-%m-%dT%H")


def resets_at(name: BudgetWindow, now: datetime) -> datetime:
    now = now.astimezone(UTC)
    if name == "day":
        return (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (now + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)


def limit_of(limits: BudgetLimits, name: BudgetWindow) -> int:
    return limits.daily_tokens if name == "day" else limits.hourly_tokens


def roll(account: Account, now: datetime) -> None:
    """Start a fresh window wherever the hour or the day has turned (never go back)."""
    for name in WINDOWS:
        current = window_start(name, now)
        if account.window(name).start < current:
            setattr(account, name, Window(start=current))


# --- the four operations ------------------------------------------------------------


def reserve(account: Account, task_id: str, amount: int, limits: BudgetLimits, now: datetime,
            scope: Literal["user", "tenant"]) -> Refusal | None:
    """Hold `amount` for the task if it fits every window; None if it holds it now."""
    roll(account, now)
    if task_id in account.holds:
        return None  # a redelivery, or another delivery of the same task got here first
    for name in WINDOWS:
        left = account.remaining(name, limits)
        if amount > left:
            return Refusal(scope=scope, window=name, limit=limit_of(limits, name), remaining=max(left, 0),
                           resets_at=resets_at(name, now))
    account.holds[task_id] = Hold(reserved=amount, since=now.timestamp())
    return None


def extend(account: Account, task_id: str, part: str, amount: int, limits: BudgetLimits, now: datetime,
           scope: Literal["user", "tenant"]) -> Refusal | int:
    """Hold `amount` more for one part of a running task if it fits every window (and, in the user's account,
    the task's cap); else why not. Returns the tokens the part holds: once per part, so asking again changes
    nothing and answers with the first amount."""
    roll(account, now)
    hold = account.holds.get(task_id)
    if hold is None or hold.closed:
        return Refusal(scope=scope, window="ended", limit=0, remaining=0, resets_at=None)
    if part in hold.extensions:
        return hold.extensions[part]
    cap = limits.per_task_tokens
    if cap is not None and scope == "user" and hold.posted_tokens + hold.reserved + amount > cap:
        return Refusal(scope=scope, window="task", limit=cap,
                       remaining=max(0, cap - hold.posted_tokens - hold.reserved), resets_at=None)
    for name in WINDOWS:
        left = account.remaining(name, limits)
        if amount > left:
            return Refusal(scope=scope, window=name, limit=limit_of(limits, name), remaining=max(left, 0),
                           resets_at=resets_at(name, now))
    hold.reserved += amount
    hold.extensions[part] = amount
    return amount


def unextend(account: Account, task_id: str, part: str) -> None:
    """Give back what `extend` held for the part (its tenant refused it)."""
    hold = account.holds.get(task_id)
    if hold is not None and not hold.closed and part in hold.extensions:
        hold.reserved = max(0, hold.reserved - hold.extensions.pop(part))


def unreserve(account: Account, task_id: str) -> None:
    """Undo a reservation of a task that was not admitted (it posted nothing)."""
    hold = account.holds.get(task_id)
    if hold is not None and not hold.steps:
        del account.holds[task_id]


def post(account: Account, task_id: str, step_id: str, tokens: int, cost_usd: float, limits: BudgetLimits,
         now: datetime, thresholds: bool, charge: StepCost | None = None) -> Posted | None:
    """Post a step's usage once; None if this account has it already. `charge`: keep the step's cost
    in the hold (with its tokens beyond the reservation) until the journal lists it.

    The caller must know that the step is not in the task's journal when the task has
    no hold here (a late step): then a closed hold is made to carry the step id until
    the journal has it."""
    hold = account.holds.get(task_id)
    if hold is not None and step_id in hold.steps:
        return None
    roll(account, now)
    if hold is None:
        hold = account.holds[task_id] = Hold(reserved=0, since=now.timestamp(), closed=True)
    over = 0 if hold.closed else max(0, tokens - hold.reserved)
    if not hold.closed:
        hold.reserved = max(0, hold.reserved - tokens)
    hold.steps[step_id] = over
    if charge is not None:
        hold.costs.append(msgspec.structs.replace(charge, over_reservation=over))
    for name in WINDOWS:
        window = account.window(name)
        before = window.used
        window.used += tokens
        window.cost_usd += cost_usd
        if thresholds:
            limit = limit_of(limits, name)
            for pct in THRESHOLDS:
                if before * 100 < pct * limit <= window.used * 100:
                    window.crossed.setdefault(pct, task_id)
    return Posted(over_reservation=over)


def close(account: Account, task_id: str) -> dict[str, int]:
    """The task ended: its hold reserves nothing more. Returns the step ids it posted."""
    hold = account.holds.get(task_id)
    if hold is None:
        return {}
    hold.closed, hold.reserved = True, 0
    return dict(hold.steps)


def settle(account: Account, task_id: str, journaled: set[str]) -> bool:
    """Drop the task's closed hold if the journal lists every step it posted."""
    hold = account.holds.get(task_id)
    if hold is None or not hold.closed or not set(hold.steps) <= journaled:
        return False
    del account.holds[task_id]
    return True


def expire(account: Account, cutoff: float) -> dict[str, list[StepCost]]:
    """Close every open hold made before `cutoff` (unix seconds); returns their task ids and the costs
    of the steps they kept, for the journals."""
    expired = [task_id for task_id, hold in account.holds.items()
               if not hold.closed and not hold.waiting and hold.since < cutoff]
    for task_id in expired:
        close(account, task_id)
    return {task_id: list(account.holds[task_id].costs) for task_id in expired}


# --- notices -------------------------------------------------------------------------


class DueNotice(msgspec.Struct, frozen=True, kw_only=True):
    window: BudgetWindow
    start: str
    threshold_pct: int
    task_id: str
    used: int
    cost_usd: float


def due_notices(account: Account) -> list[DueNotice]:
    """Thresholds crossed in the current windows whose notice is not published yet."""
    due = []
    for name in WINDOWS:
        window = account.window(name)
        for pct, task_id in sorted(window.crossed.items()):
            if pct not in window.notified:
                due.append(DueNotice(window=name, start=window.start, threshold_pct=pct, task_id=task_id,
                                     used=window.used, cost_usd=window.cost_usd))
    return due


def mark_notified(account: Account, sent: list[DueNotice]) -> None:
    for notice in sent:
        window = account.window(notice.window)
        if window.start == notice.start and notice.threshold_pct not in window.notified:
            window.notified.append(notice.threshold_pct)
