"""Budgets on a real nats-server: replicas share one ledger; a step is billed once."""

from __future__ import annotations

import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

from contracts import StepCompleted, TaskAdmitted, TaskRejected, TaskSpec, TaskValidated, TokenEstimate, Usage, subjects
from services.budget.handlers import ledger_key
from services.budget.ledger import Ledger, day_window
from services.stack import Services
from contracts.policy import BudgetLimits, Defaults, Policy
from tests.conftest import apply, running, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def validated(task_id: str, tenant: str, user: str, estimate: int) -> TaskValidated:
    return TaskValidated(task_id=task_id, tenant=tenant, user=user, spec=TaskSpec(agent="research", prompt="p"),
                         estimate=TokenEstimate(prompt_tokens=estimate // 2, max_output_tokens=estimate - estimate // 2))


async def test_two_budget_replicas_admitting_concurrently_never_exceed_the_daily_limit(settings, tenant, user,
                                                                                      tmp_path):
    from services.client import Client

    await apply(settings, Policy(defaults=Defaults(budget=BudgetLimits(daily_tokens=10_000))))
    replicas = Services(settings.nats_url, tmp_path / "logs")
    try:
        for _ in range(2):
            replicas.start_one("budget")
        async with Client.connect(settings, "test") as client, client.events() as events:
            await wait_until(lambda: _replicas(client, "corral-budget", 2), timeout=20)
            for n in range(50):  # 50 x 700 tokens asked, 10,000 allowed: 14 fit
                await client.bus.emit(subjects.task_validated(tenant), validated(f"c{n}", tenant, user, 700))
            decided: dict[str, object] = {}
            async for event in events:
                if isinstance(event, (TaskAdmitted, TaskRejected)) and event.user == user:
                    decided[event.task_id] = event
                    if len(decided) == 50:
                        break
    finally:
        replicas.stop()
    admitted = [e for e in decided.values() if isinstance(e, TaskAdmitted)]
    assert sum(e.reserved_tokens for e in admitted) <= 10_000
    assert len(admitted) == 14  # not starved either: every task that fits got in
    assert all(e.reason == "over_budget" for e in decided.values() if isinstance(e, TaskRejected))


async def _replicas(client, name: str, count: int) -> bool:
    return (await client.running_services())[name] >= count


async def test_a_step_completion_delivered_three_times_is_billed_once(settings, tenant, user):
    async with running(settings, "budget"):
        from services.client import Client

        async with Client.connect(settings, "test") as client, client.events() as events:
            await client.wait_ready({"corral-budget"})
            await client.bus.emit(subjects.task_validated(tenant), validated("b1", tenant, user, 500))
            async for event in events:  # steps run only once a task is admitted
                if isinstance(event, TaskAdmitted) and event.task_id == "b1":
                    break
            step = StepCompleted(task_id="b1", tenant=tenant, user=user, step_id="b1-a1", attempt=1, agent="research",
                                 dependency="simulated/sim-large", model="sim-large", output="ok",
                                 usage=Usage(input_tokens=20, output_tokens=80), latency_ms=1.0)
            for n in range(3):  # three copies that escape de-duplication, as after the dedup window
                await client.bus.js.publish(subjects.step_completed(tenant), msgspec.json.encode(step),
                                            headers={subjects.HEADER_MSG_ID: f"copy-{n}"})
            kv = await client.bus.js.key_value(subjects.KV_BUDGET)
            key = ledger_key(tenant, user, day_window(step.occurred_at))

            async def billed() -> Ledger | None:
                try:
                    ledger = msgspec.json.decode((await kv.get(key)).value, type=Ledger)
                except KeyNotFoundError:
                    return None
                return ledger if ledger.posted else None

            await wait_until(billed)
            await wait_until(lambda: _all_acked(client))  # all three copies handled
            ledger = msgspec.json.decode((await kv.get(key)).value, type=Ledger)
    assert ledger.committed == 100
    assert ledger.posted == {"b1-a1": 100}
    assert ledger.reserved["b1"] == 400


async def _all_acked(client) -> bool:
    info = await client.bus.js.consumer_info(subjects.STREAM_STEPS, subjects.CONSUMER_BUDGET_USAGE)
    return info.delivered.stream_seq >= 3 and info.num_ack_pending == 0 and info.num_pending == 0
