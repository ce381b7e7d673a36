"""budget: reserve at admission, post each step once, release at the end, expire what is left.

Every change is a compare-and-set on one key (shared/kv.py), so any number of
replicas share the ledger without a lock, and every handler can be run again
(after a crash, or for a redelivered message) without counting anything twice:

- **reserve** is two-phase because a user and their tenant are two keys: hold the
  estimate in the user's account, then in the tenant's; if the tenant refuses,
  the decision is "rejected" and the user's hold is given back. The decision is
  written once (KV create) in the task's journal before anything is published, and
  whoever comes later (a redelivery, a concurrent duplicate) follows that decision
  and makes the holds agree with it. A user or tenant whose account has grown too large
  to hold another task (one hold per running task) is refused first, `rate_limited`.
- **extend** reserves more for one part of a running plan (a subtask, the synthesis) that would take the task
  past what it holds: the same two-phase test as reserve, on the task's open hold, once per part (the part's
  id is kept in the hold, so asking again holds nothing twice). A closed hold (the task ended) refuses.
- **post** posts the step (a StepCompleted's usage, or what a failed step's model calls used, its StepFailed's)
  to the tenant's account, then to the user's, each in one
  compare-and-set that also keeps the step id in the task's hold (the user's keeps its
  cost too). So a step in the user's hold is in the tenant's. While the task runs,
  that is all: its release copies the user's hold into the journal. A step that finds
  the hold closed (its task's release has begun) goes into the journal itself. When
  the task has no hold in an account any more (it ended before this step was posted),
  the handler reads the account, then the journal, and writes the account only if it
  did not change since it was read: a step is in the journal before its hold goes.
- **release** first waits, at most STEP_WAITS times, for the usage of the steps the
  task's end reports: the executor publishes each StepCompleted before the end, but
  the two reach the budget on different consumers. Then it marks the journal
  finished with the steps the user's hold has kept (publishing the task's
  CostNotice first, when that completes it), then closes the task's holds (they
  reserve nothing more) and drops each one whose steps the journal lists, one
  compare-and-set per account. A step posted in between is found by that close:
  it is journaled, and its holds dropped, right after. A step posted later finds the
  hold closed or gone and journals itself.
- **expire**: a hold older than the timeout is closed the same way, by any replica.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any

import msgspec

from contracts import CostNotice, StepCompleted, StepFailed, TaskAdmitted, TaskCompleted, TaskFailed, TaskRejected, TaskValidated
from contracts import subjects
from contracts.events import task_ref
from contracts.policy import BudgetLimits, Policy
from contracts.commands import ExtendReservation
from contracts.queries import BudgetReply, CostReply, ModelCost, ReservationReply, StepCost, WindowUse
from services.budget import ledger
from services.budget.ledger import WINDOWS, Account, Refusal, TaskJournal
from shared.consume import delivery
from shared.errors import NotYet
from shared.kv import TypedBucket

log = logging.getLogger(__name__)
Emit = Callable[[str, Any], Awaitable[None]]
Clock = Callable[[], datetime]
DEFAULT_HOLD_TIMEOUT_S = 15 * 60.0
DEFAULT_ACCOUNT_MAX_BYTES = 512 * 1024  # half of nats-server's default max payload
CROWDED_RETRY_S = 30.0
STEP_WAITS, STEP_WAIT_S = 2, 0.1
"""How often, and how long each time, a task's end waits for its steps' usage before it is released anyway.
`python -m tests.bench --skip-floor` counts the steps posted after their release began: 0 of 2,000 with
these; with STEP_WAITS = 0, 43 and 997 in two runs (60 % in one instrumented run before)."""


def user_key(tenant: str, user: str) -> str:
    return f"acct.user.{tenant}.{user}"


def tenant_key(tenant: str) -> str:
    return f"acct.tenant.{tenant}"


def task_key(tenant: str, task_id: str) -> str:
    return f"task.{task_ref(tenant, task_id)}"


def _tenant_of(account_key: str) -> str:
    """The tenant of `acct.user.<tenant>.<user>` or `acct.tenant.<tenant>`."""
    return account_key.split(".", 3)[2]


ACCOUNT_KEYS = "acct.>"


class Budget:
    """The budget's handlers and what they need: the policy, the ledger's records, a clock."""

    def __init__(self, policy: Callable[[], Policy], accounts: TypedBucket[Account],
                 journals: TypedBucket[TaskJournal | None], emit: Emit, clock: Clock,
                 hold_timeout_s: float = DEFAULT_HOLD_TIMEOUT_S,
                 account_max_bytes: int = DEFAULT_ACCOUNT_MAX_BYTES) -> None:
        self.policy = policy
        self.accounts = accounts
        self.journals = journals
        self.emit = emit
        self.clock = clock
        self.hold_timeout_s = hold_timeout_s
        self.account_max_bytes = account_max_bytes
        self.late_steps = 0  # step events handled after their task's release had begun (redeliveries too)

    # --- limits --------------------------------------------------------------------

    def _limits(self, tenant: str, user: str) -> tuple[BudgetLimits, BudgetLimits]:
        policy = self.policy()
        return policy.budget_for(tenant, user), policy.tenant_budget_for(tenant)

    def _accounts(self, tenant: str, user: str) -> list[tuple[str, BudgetLimits, bool]]:
        """(key, limits, notify the user of thresholds) of the two accounts a task of this user draws on."""
        user_limits, tenant_limits = self._limits(tenant, user)
        return [(user_key(tenant, user), user_limits, True), (tenant_key(tenant), tenant_limits, False)]

    # --- reserve -------------------------------------------------------------------

    async def on_validated(self, task: TaskValidated) -> None:
        # Decide first, then create the journal: a redelivery decides again (reserving is idempotent
        # per task) and the first decision written wins; `_agree` undoes what the second one held.
        decision = await self._decide(task)
        journal = await self.journals.create(task_key(task.tenant, task.task_id), decision)
        await self._agree(task, journal)

    async def _decide(self, task: TaskValidated) -> TaskJournal:
        """Reserve the estimate in the user's account, then in the tenant's; the decision as a journal."""
        now, amount = self.clock(), task.estimate.total
        (ukey, user_limits, _), (tkey, tenant_limits, _) = self._accounts(task.tenant, task.user)
        if (crowded := self._crowded(task, ukey, tkey, now)) is not None:
            return TaskJournal(task_id=task.task_id, tenant=task.tenant, user=task.user, status="rejected",
                               decided_at=now, rejection=crowded)
        refusal = self._over_task_cap(amount, user_limits, tenant_limits)
        if refusal is None:
            refusal = await self.accounts.update(ukey, partial(ledger.reserve, task_id=task.task_id, amount=amount,
                                                               limits=user_limits, now=now, scope="user"))
        if refusal is None:
            refusal = await self.accounts.update(tkey, partial(ledger.reserve, task_id=task.task_id, amount=amount,
                                                               limits=tenant_limits, now=now, scope="tenant"))
        if refusal is None:
            return TaskJournal(task_id=task.task_id, tenant=task.tenant, user=task.user, status="admitted",
                               reserved_tokens=amount, decided_at=now)
        rejected = TaskRejected(task_id=task.task_id, tenant=task.tenant, user=task.user, reason="over_budget",
                                stage="budget", message=refusal_message(refusal, amount),
                                retry_after_s=(refusal.resets_at - now).total_seconds() if refusal.resets_at else None,
                                remaining_tokens=refusal.remaining, resets_at=refusal.resets_at, occurred_at=now,
                                received_at=task.received_at)
        return TaskJournal(task_id=task.task_id, tenant=task.tenant, user=task.user, status="rejected",
                           decided_at=now, rejection=rejected)

    def _crowded(self, task: TaskValidated, ukey: str, tkey: str, now: datetime) -> TaskRejected | None:
        """A rejection if the user's or the tenant's account is too large to hold another task. An account
        keeps a hold per running task, and a write of it must fit in one message: past the limit, new
        tasks wait, so that the running ones' steps and releases still fit. Judged on the account as this
        process last wrote it (no read): the budget writes both accounts of every task it admits."""
        for whose, key in (("you have", ukey), ("your tenant has", tkey)):
            size = self.accounts.stored_size(key)
            if size > self.account_max_bytes:
                return TaskRejected(
                    task_id=task.task_id, tenant=task.tenant, user=task.user, reason="rate_limited", stage="budget",
                    message=(f"{whose} too many tasks running at once for the budget to hold another: their "
                             f"reservations take {size:,} bytes, at most {self.account_max_bytes:,}; retry "
                             f"when some have finished"),
                    retry_after_s=CROWDED_RETRY_S, occurred_at=now, received_at=task.received_at)
        return None

    @staticmethod
    def _over_task_cap(amount: int, user_limits: BudgetLimits, tenant_limits: BudgetLimits) -> Refusal | None:
        for scope, limits in (("user", user_limits), ("tenant", tenant_limits)):
            cap = limits.per_task_tokens
            if cap is not None and amount > cap:
                return Refusal(scope=scope, window="task", limit=cap, remaining=cap, resets_at=None)
        return None

    async def _agree(self, task: TaskValidated, journal: TaskJournal) -> None:
        """Make the holds agree with the decision, then publish it (again, on a redelivery:
        the stream drops a repeat within its dedup window, and the executor ignores one after)."""
        if journal.status != "admitted":  # rejected, or a late redelivery of a task that has ended
            for key, _, _ in self._accounts(task.tenant, task.user):
                await self.accounts.update(key, partial(ledger.unreserve, task_id=task.task_id))
        if journal.status == "rejected" and journal.rejection is not None:
            await self.emit(subjects.task_rejected(task.tenant), journal.rejection)
            return
        admitted = TaskAdmitted(task_id=task.task_id, tenant=task.tenant, user=task.user, spec=task.spec,
                                estimate=task.estimate, reserved_tokens=journal.reserved_tokens,
                                window=ledger.window_start("day", journal.decided_at), received_at=task.received_at,
                                high_stakes_tools=task.high_stakes_tools)
        await self.emit(subjects.task_admitted(task.tenant), admitted)

    # --- extend --------------------------------------------------------------------

    async def extend(self, command: ExtendReservation) -> ReservationReply:
        """Reserve more for one part of a running task: in the user's account, then the tenant's (given back
        to the user's if the tenant's refuses), as at admission. Once per part, so a retry of the same part
        (a redelivered event, a coordinator deciding again) holds nothing twice."""
        now, amount, task_id = self.clock(), command.tokens, command.task_id
        (ukey, user_limits, _), (tkey, tenant_limits, _) = self._accounts(command.tenant, command.user)
        change = partial(ledger.extend, task_id=task_id, part=command.part, amount=amount, now=now)
        held = await self.accounts.update(ukey, partial(change, limits=user_limits, scope="user"))
        if isinstance(held, int):
            refusal = await self.accounts.update(tkey, partial(change, limits=tenant_limits, scope="tenant"))
            if isinstance(refusal, int):
                return ReservationReply(granted=True, tokens=held)
            await self.accounts.update(ukey, partial(ledger.unextend, task_id=task_id, part=command.part))
        else:
            refusal = held
        if refusal.window == "ended":
            message = f"task {task_id} holds no reservation any more (it ended, or its hold expired)"
        else:
            message = refusal_message(refusal, amount).replace("this task needs", f"part {command.part} needs")
        return ReservationReply(granted=False, message=message, remaining_tokens=refusal.remaining,
                                resets_at=refusal.resets_at)

    # --- post ----------------------------------------------------------------------

    async def on_step_completed(self, step: StepCompleted) -> None:
        await self.on_step(step)

    async def on_step(self, step: StepCompleted | StepFailed) -> None:
        """Post a step's usage, once per step id: an answered step's, or what a failed one used before it failed
        (a fast-tier answer that failed validation, an agent loop's turns before a failed call)."""
        usage = step.usage
        if usage is None:  # failed before any model call answered: nothing to bill
            return
        now, tokens = self.clock(), usage.total
        cost = self.policy().price_of(step.model).cost(usage)
        hit = step.cache if isinstance(step, StepCompleted) else None
        charge = StepCost(step_id=step.step_id, model=step.model, usage=usage, cost_usd=cost, posted_at=now,
                          saved=hit.source if hit else "", saved_tokens=max(0, hit.saved.total - tokens) if hit else 0,
                          saved_usd=hit.cost_avoided_usd if hit else 0.0,
                          failed=step.error if isinstance(step, StepFailed) else "")
        (ukey, user_limits, _), (tkey, tenant_limits, _) = self._accounts(step.tenant, step.user)
        post = partial(self._post, step=step, tokens=tokens, cost=cost, now=now)
        await self.accounts.update(tkey, partial(post, limits=tenant_limits, charge=None))  # the tenant's first
        user = await self.accounts.update(ukey, partial(post, limits=user_limits, charge=charge))
        over = user.posted.over_reservation if user.posted else await self._over_of(ukey, step)
        if over:
            log.warning("task %s: step %s used %d tokens beyond its reservation", step.task_id, step.step_id, over)
        if not user.running:  # the release has begun (or is over): it may not see this step
            self.late_steps += 1
            charge = msgspec.structs.replace(charge, over_reservation=over)
            journal = await self.journals.update(task_key(step.tenant, step.task_id),
                                                 partial(_journal_steps, charges=[charge]),
                                                 default=partial(_untracked, step, now))
            await self._settle(step.tenant, step.user, journal)
        if user.after is not None and user.after.due:
            await self._notify_thresholds(step.tenant, step.user, user.after)

    async def _post(self, account: Account, *, step: StepCompleted | StepFailed, tokens: int, cost: float, limits: BudgetLimits,
                    now: datetime, charge: StepCost | None) -> _Post:
        """Post the step; with a `charge` (the user's account) keep its cost in the hold and report what the
        account holds after."""
        hold = account.holds.get(step.task_id)
        posted = None
        if hold is not None or step.step_id not in await self._journaled(step.tenant, step.task_id):
            posted = ledger.post(account, step.task_id, step.step_id, tokens, cost, limits, now,
                                 thresholds=charge is not None, charge=charge)
        # else: posted, journaled and settled already (the account was read before the journal)
        return _Post(posted=posted, running=hold is not None and not hold.closed,
                     after=_After.of(account, limits, now) if charge is not None else None)

    async def _journaled(self, tenant: str, task_id: str) -> set[str]:
        journal = await self.journals.get(task_key(tenant, task_id))
        return journal.step_ids() if journal else set()

    async def _over_of(self, key: str, step: StepCompleted | StepFailed) -> int:
        """Tokens beyond the reservation, as the first posting of this step recorded them."""
        account = await self.accounts.get(key)
        hold = account.holds.get(step.task_id) if account else None
        return hold.steps.get(step.step_id, 0) if hold else 0

    # --- release and expire -----------------------------------------------------------

    async def on_task_finished(self, task: TaskCompleted | TaskFailed) -> None:
        key, spent = task_key(task.tenant, task.task_id), task.usage.total if task.usage is not None else 0
        (ukey, user_limits, _), _ = self._accounts(task.tenant, task.user)
        account, hold = await self._hold(ukey, task.task_id, cached=True)  # as this process last wrote it
        if _lacks_steps(hold, spent):  # another replica may have posted them: ask the server
            account, hold = await self._hold(ukey, task.task_id, cached=False)
        if _lacks_steps(hold, spent) and delivery() <= STEP_WAITS:
            raise NotYet(f"task {task.task_id}: waiting for its steps' usage ({spent} tokens) before releasing it",
                         retry_after_s=STEP_WAIT_S)
        user_after = _After.releasing(account or Account(), task.task_id, user_limits, self.clock())
        journal = await self.journals.update(key, partial(
            self._finish_and_notify, steps=list(hold.costs) if hold else [], expected_tokens=spent,
            user_after=user_after))
        _, unjournaled = await self._close_and_settle(task.tenant, task.user, task.task_id, close=True,
                                                      journaled=journal.step_ids() if journal else None)
        if unjournaled and journal is not None:  # posted since the read above, while the hold was open
            journal = await self.journals.update(key, partial(_journal_steps, charges=unjournaled))
            await self._settle(task.tenant, task.user, journal)

    async def _hold(self, key: str, task_id: str, *, cached: bool) -> tuple[Account | None, ledger.Hold | None]:
        account, _ = await self.accounts.read(key, cached=cached)
        return account, (account.holds.get(task_id) if account is not None else None)

    async def _finish_and_notify(self, journal: TaskJournal | None, *, steps: list[StepCost], expected_tokens: int,
                                 user_after: _After) -> TaskJournal | None:
        """Mark the journal finished, with the steps the user's hold kept; if that completes it, publish its
        CostNotice before the write that marks it sent. A retried write publishes it again, which the stream
        drops as a duplicate."""
        journal = _finish(journal, status="finished", expected_tokens=expected_tokens, steps=steps)
        if journal is not None and journal.notice_due():
            await self._publish_task_notice(journal, user_after)
            journal.notified = True
        return journal

    async def expire_stale(self) -> list[str]:
        """Close holds older than the hold timeout, in every account; returns the tasks expired."""
        cutoff = self.clock().timestamp() - self.hold_timeout_s
        expired: list[str] = []
        async for key, account in self.accounts.scan(ACCOUNT_KEYS):
            stale = [task_id for task_id, hold in account.holds.items() if hold.since < cutoff and not hold.waiting]
            if stale:  # open ones expire; closed ones left unsettled (a replica died in between) settle
                closed_now = await self.accounts.update(key, partial(ledger.expire, cutoff=cutoff))
                for task_id in stale:
                    if task_id in closed_now:
                        expired.append(task_id)
                        log.warning("task %s: reservation in %s expired after %.0f s", task_id, key,
                                    self.hold_timeout_s)
                    journal = await self.journals.update(task_key(_tenant_of(key), task_id), partial(
                        _finish, status="expired", steps=closed_now.get(task_id, [])))
                    await self.accounts.update(key, partial(ledger.settle, task_id=task_id,
                                                            journaled=journal.step_ids() if journal else set()))
            elif ledger.due_notices(account) and key.startswith("acct.user."):
                _, _, tenant, user = key.split(".", 3)
                limits, _ = self._limits(tenant, user)
                # published before a crash left them unmarked
                await self._notify_thresholds(tenant, user, _After.of(account, limits, self.clock()))
        return expired

    async def _settle(self, tenant: str, user: str, journal: TaskJournal | None) -> None:
        """After a step was journaled: if the task has ended, drop its closed holds the journal accounts
        for, and publish its CostNotice once it is complete."""
        if journal is None or journal.status not in ("finished", "expired"):
            return
        user_after, _ = await self._close_and_settle(tenant, user, journal.task_id, close=False,
                                                     journaled=journal.step_ids())
        if journal.notice_due():
            await self._publish_task_notice(journal, user_after)
            await self.journals.update(task_key(journal.tenant, journal.task_id), _mark_notified)

    async def _close_and_settle(self, tenant: str, user: str, task_id: str, *, close: bool,
                                journaled: set[str] | None) -> tuple[_After, list[StepCost]]:
        """Close the task's holds if `close`; drop the closed ones whose steps are all `journaled`.
        Returns the user's account as written, and the costs its hold keeps that `journaled` lacks."""
        change = partial(_close_and_settle, task_id=task_id, close=close, journaled=journaled, now=self.clock())
        (user_account, user_limits, _), (tenant_account, tenant_limits, _) = self._accounts(tenant, user)
        written = await self.accounts.update(user_account, partial(change, limits=user_limits, report=True))
        await self.accounts.update(tenant_account, partial(change, limits=tenant_limits, report=False))
        return written

    # --- notices ----------------------------------------------------------------------

    async def _publish_task_notice(self, journal: TaskJournal, user_after: _After) -> None:
        await self.emit(subjects.cost_notice(journal.tenant, journal.user), CostNotice(
            task_id=journal.task_id, tenant=journal.tenant, user=journal.user, reason="task", tokens=journal.tokens,
            cost_usd=round(journal.cost_usd, 6), remaining_daily_tokens=user_after.day,
            remaining_hourly_tokens=user_after.hour))

    async def _notify_thresholds(self, tenant: str, user: str, user_after: _After) -> None:
        """Publish the threshold notices due in the user's account as it was written, then mark them sent."""
        for notice in user_after.due:
            await self.emit(subjects.cost_notice(tenant, user), CostNotice(
                task_id=notice.task_id, tenant=tenant, user=user, reason="threshold", tokens=notice.used,
                cost_usd=round(notice.cost_usd, 6), remaining_daily_tokens=user_after.day,
                remaining_hourly_tokens=user_after.hour, window=notice.window, window_start=notice.start,
                threshold_pct=notice.threshold_pct))
        await self.accounts.update(user_key(tenant, user), partial(ledger.mark_notified, sent=user_after.due))

    # --- queries ------------------------------------------------------------------------

    async def show(self, tenant: str, user: str) -> BudgetReply:
        now = self.clock()
        user_limits, tenant_limits = self._limits(tenant, user)
        windows = []
        mine = Account()
        for scope, key, limits in (("user", user_key(tenant, user), user_limits),
                                   ("tenant", tenant_key(tenant), tenant_limits)):
            account = await self.accounts.get(key) or Account()
            ledger.roll(account, now)
            mine = account if scope == "user" else mine
            for name in WINDOWS:
                window = account.window(name)
                windows.append(WindowUse(
                    scope=scope, window=name, start=window.start, limit=ledger.limit_of(limits, name),
                    used=window.used, reserved=account.reserved, remaining=account.remaining(name, limits),
                    cost_usd=round(window.cost_usd, 6), resets_at=ledger.resets_at(name, now)))
        return BudgetReply(tenant=tenant, user=user, windows=windows, open_tasks=mine.open_holds,
                           per_task_tokens=user_limits.per_task_tokens)

    async def cost(self, tenant: str, task_id: str) -> CostReply:
        journal = await self.journals.get(task_key(tenant, task_id))
        if journal is None:
            return CostReply(task_id=task_id, found=False)
        if journal.status == "admitted":  # running: the steps so far wait in the user's hold
            account = await self.accounts.get(user_key(journal.tenant, journal.user))
            hold = account.holds.get(task_id) if account is not None else None
            journal.add_steps(hold.costs if hold is not None else [])
        models: dict[str, list[StepCost]] = {}
        for step in journal.steps:
            models.setdefault(step.model, []).append(step)
        return CostReply(
            task_id=task_id, found=True, tenant=journal.tenant, user=journal.user, status=journal.status,
            reserved_tokens=journal.reserved_tokens, tokens=journal.tokens, cost_usd=round(journal.cost_usd, 6),
            steps=journal.steps, saved_tokens=sum(s.saved_tokens for s in journal.steps),
            saved_usd=round(sum(s.saved_usd for s in journal.steps), 6),
            models=[ModelCost(model=model, steps=len(steps), input_tokens=sum(s.usage.input_tokens for s in steps),
                              output_tokens=sum(s.usage.output_tokens for s in steps),
                              cached_tokens=sum(s.usage.cached_tokens for s in steps),
                              cost_usd=round(sum(s.cost_usd for s in steps), 6))
                    for model, steps in sorted(models.items())])


def _lacks_steps(hold: ledger.Hold | None, spent: int) -> bool:
    """The task's hold is open and its steps' usage adds up to less than the task's end reports."""
    return hold is not None and not hold.closed and spent > hold.posted_tokens


class _After(msgspec.Struct, frozen=True):
    """What a change left in an account, for the notices that follow it without reading it again."""

    day: int
    hour: int
    due: list[ledger.DueNotice]

    @classmethod
    def of(cls, account: Account, limits: BudgetLimits, now: datetime) -> _After:
        ledger.roll(account, now)
        return cls(account.remaining("day", limits), account.remaining("hour", limits), ledger.due_notices(account))

    @classmethod
    def releasing(cls, account: Account, task_id: str, limits: BudgetLimits, now: datetime) -> _After:
        """What closing the task's hold will leave in (this copy of) the account."""
        ledger.close(account, task_id)
        return cls.of(account, limits, now)


class _Post(msgspec.Struct, frozen=True):
    """What posting a step to one account did."""

    posted: ledger.Posted | None
    """None: this account had the step already."""
    running: bool
    """The task's hold was open: its release, still to come, will journal the step."""
    after: _After | None
    """The user's account as written (None for the tenant's)."""


def _close_and_settle(account: Account, *, task_id: str, close: bool, journaled: set[str] | None,
                      limits: BudgetLimits, now: datetime, report: bool) -> tuple[_After, list[StepCost]] | None:
    if close:
        ledger.close(account, task_id)
    if journaled is not None:
        ledger.settle(account, task_id, journaled)
    if not report:  # only the user's: a tenant's holds are many
        return None
    hold = account.holds.get(task_id)
    unjournaled = [cost for cost in hold.costs if cost.step_id not in (journaled or set())] if hold else []
    return _After.of(account, limits, now), unjournaled


# --- journal changes (pure: they run again on a conflict) ---------------------------------


def _untracked(step: StepCompleted | StepFailed, now: datetime) -> TaskJournal:
    """The journal of a task this budget never decided (a step published by hand): its steps still count."""
    return TaskJournal(task_id=step.task_id, tenant=step.tenant, user=step.user, status="admitted", decided_at=now)


def _journal_steps(journal: TaskJournal | None, *, charges: list[StepCost]) -> TaskJournal | None:
    if journal is not None:
        journal.add_steps(charges)
    return journal


def _finish(journal: TaskJournal | None, *, status: ledger.JournalStatus, expected_tokens: int | None = None,
            steps: list[StepCost] | None = None) -> TaskJournal | None:
    if journal is None or journal.status == "rejected":
        return journal
    if status == "finished" or journal.status == "admitted":
        journal.status = status
    if expected_tokens is not None:
        journal.expected_tokens = expected_tokens
    journal.add_steps(steps or [])
    return journal


def _mark_notified(journal: TaskJournal | None) -> TaskJournal | None:
    if journal is not None:
        journal.notified = True
    return journal


def refusal_message(refusal: Refusal, amount: int) -> str:
    whose = "your" if refusal.scope == "user" else "your tenant's"
    if refusal.window == "task":
        return (f"this task needs about {amount:,} tokens; {whose} limit per task is {refusal.limit:,} "
                f"(ask for fewer max_tokens or a shorter prompt)")
    span = "daily" if refusal.window == "day" else "hourly"
    resets = f"{refusal.resets_at:%Y-%m-%d %H:%M}" if refusal.resets_at else "?"
    return (f"{whose} {span} budget of {refusal.limit:,} tokens: {refusal.remaining:,} left, this task needs about "
            f"{amount:,}; it resets at {resets} UTC (ask for fewer max_tokens or wait)")
