"""budget service: admits validated tasks against token budgets, posts steps, releases and expires
reservations, answers `corral budget show` and `corral cost`, and reserves more for a running plan's parts
that need it."""

from __future__ import annotations

import logging
from functools import partial
from typing import Union

import anyio
import msgspec

from contracts import StepCompleted, StepFailed, TaskCompleted, TaskFailed, TaskValidated, utcnow
from contracts import subjects as s
from contracts.commands import ExtendReservation
from contracts.approvals import ApprovalDecided, ApprovalRequested
from contracts.queries import BudgetQuery, CostQuery
from services.budget import waits
from services.budget.handlers import Budget, Clock
from services.budget.ledger import Account, TaskJournal
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.quarantine import Quarantine
from shared.runtime import micro_service
from shared.streams import consumer_config

NAME = "budget"
JOURNAL_TTL_S = 35 * 24 * 3600.0
"""A task's journal (what `corral cost` shows) is kept 35 days after its last change: a month's bills, and
far longer than any of the task's events can come back (shared.streams.EVENTS_MAX_AGE_S)."""
IDLE_ACCOUNT_TTL_S = 2 * 24 * 3600.0
"""An account that holds nothing goes two days after its last change: its windows have passed by then, and a
fresh account is the same thing. One with holds stays (its holds expire, and that changes it)."""
log = logging.getLogger(__name__)
_budget_query = msgspec.json.Decoder(BudgetQuery)
_cost_query = msgspec.json.Decoder(CostQuery)
_extend = msgspec.json.Decoder(ExtendReservation)


def _idle_account_ttl(account: Account) -> float | None:
    return None if account.holds else IDLE_ACCOUNT_TTL_S


async def run(settings: Settings, stop: anyio.Event, *, clock: Clock = utcnow) -> None:
    async with Bus.connect(settings, NAME) as bus:
        kv, policy_kv = await bus.bucket(s.KV_BUDGET), await bus.policy_bucket()
        quarantine = Quarantine(bus.js, NAME)
        policy = await PolicyView.load(policy_kv, quarantine)
        accounts = TypedBucket(kv, Account, Account, expires=_idle_account_ttl, reuse_written=True,
                               quarantine=quarantine)
        journals = TypedBucket(kv, TaskJournal, lambda: None, expires=lambda _: JOURNAL_TTL_S, quarantine=quarantine)
        budget = Budget(policy, accounts, journals, bus.emit, clock, settings.budget_hold_timeout_s,
                        settings.budget_account_max_bytes or bus.nc.max_payload // 2)

        async def show(data: bytes) -> bytes:
            query = _budget_query.decode(data)
            return msgspec.json.encode(await budget.show(query.tenant, query.user))

        async def cost(data: bytes) -> bytes:
            query = _cost_query.decode(data)
            return msgspec.json.encode(await budget.cost(query.tenant, query.task_id))

        async def extend(data: bytes) -> bytes:
            return msgspec.json.encode(await budget.extend(_extend.decode(data)))

        def stats() -> dict[str, object]:
            return {"conflicts": accounts.conflicts + journals.conflicts, "late_steps": budget.late_steps,
                    "policy": policy.stats(), "quarantined": quarantine.stats()}

        consumers = [
            Consumer(bus, s.STREAM_TASKS, consumer_config(settings, s.CONSUMER_BUDGET_ADMIT, s.ALL_VALIDATED),
                     decoder_for(TaskValidated), budget.on_validated),
            # the failed steps' filter was added later: declaring the consumer updates an older one's filters
            Consumer(bus, s.STREAM_STEPS, consumer_config(settings, s.CONSUMER_BUDGET_USAGE, s.ALL_STEP_COMPLETED,
                                                          s.ALL_STEP_FAILED),
                     decoder_for(Union[StepCompleted, StepFailed]), budget.on_step),
            Consumer(bus, s.STREAM_TASKS,
                     consumer_config(settings, s.CONSUMER_BUDGET_RELEASE, s.ALL_COMPLETED, s.ALL_FAILED),
                     decoder_for(Union[TaskCompleted, TaskFailed]), budget.on_task_finished),
            Consumer(bus, s.STREAM_APPROVALS, consumer_config(settings, s.CONSUMER_BUDGET_APPROVALS,
                                                              s.ALL_APPROVAL_REQUESTED, s.ALL_APPROVAL_DECIDED),
                     decoder_for(Union[ApprovalRequested, ApprovalDecided]), partial(waits.on_approval, budget)),
        ]
        endpoints = {"show": (s.BUDGET_SHOW, show), "cost": (s.BUDGET_COST, cost), "extend": (s.BUDGET_EXTEND, extend)}
        async with micro_service(bus, "token budgets: reserve, post, release", endpoints, stats), \
                anyio.create_task_group() as tg:
            tg.start_soon(policy.follow, policy_kv, stop)
            tg.start_soon(_sweep, budget, settings.budget_sweep_s, stop)
            for consumer in consumers:
                tg.start_soon(consumer.run, stop)


async def _sweep(budget: Budget, every_s: float, stop: anyio.Event) -> None:
    """Release reservations past their timeout. Every replica sweeps; compare-and-set lets one win."""
    while not stop.is_set():
        with anyio.move_on_after(every_s):
            await stop.wait()
        if stop.is_set():
            return
        try:
            await budget.expire_stale()
        except Exception:  # the next round tries again; a sweep never takes the service down
            log.exception("budget sweep failed")
