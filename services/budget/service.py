"""budget service: admits validated tasks against token budgets, bills steps, releases leftovers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Union

import anyio

from contracts import StepCompleted, TaskCompleted, TaskFailed, TaskValidated
from contracts import subjects as s
from services.budget.handlers import Budget
from services.budget.ledger import Ledger
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.runtime import micro_service
from shared.streams import consumer_config

NAME = "budget"


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus, micro_service(bus, "token budgets: reserve, bill, release"):
        kv, policy_kv = await bus.bucket(s.KV_BUDGET), await bus.policy_bucket()
        policy = await PolicyView.load(policy_kv)
        budget = Budget(policy, TypedBucket(kv, Ledger, Ledger), TypedBucket(kv, str, str), bus.emit,
                        clock=lambda: datetime.now(UTC))
        consumers = [
            Consumer(bus, s.STREAM_TASKS, consumer_config(settings, s.CONSUMER_BUDGET_ADMIT, s.ALL_VALIDATED),
                     decoder_for(TaskValidated), budget.on_validated),
            Consumer(bus, s.STREAM_STEPS, consumer_config(settings, s.CONSUMER_BUDGET_USAGE, s.ALL_STEP_COMPLETED),
                     decoder_for(StepCompleted), budget.on_step_completed),
            Consumer(bus, s.STREAM_TASKS,
                     consumer_config(settings, s.CONSUMER_BUDGET_RELEASE, s.ALL_COMPLETED, s.ALL_FAILED),
                     decoder_for(Union[TaskCompleted, TaskFailed]), budget.on_task_finished),
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(policy.follow, policy_kv, stop)
            for consumer in consumers:
                tg.start_soon(consumer.run, stop)
