"""The budget of an orchestrated task: its reservation covers its subtasks, and a part that would take it past
what it holds reserves more first (or fails over_budget); on a real nats-server, with several budget replicas."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import msgspec
import pytest

from contracts import TaskCompleted, TaskFailed, TaskSpec
from contracts.events import Plan, Subtask
from contracts.policy import BudgetLimits, Policy
from services.budget import ledger
from services.budget.ledger import Account
from services.client import Client
from tests.conftest import apply, services, stack, wait_until
from tests.signals import example_policy

pytestmark = [pytest.mark.anyio]
# A long request: every subtask's prompt carries it, and the guard's estimate counts it once.
REQUEST = "Ship the migration of the billing tables to the new schema, with a rollback plan. " * 25
PARTS = [Subtask(id=f"p{n}", agent=agent, instruction=f"Do part {n}.", max_tokens=64)
         for n, agent in enumerate(["research", "coding", "writing", "research"])]
SERVICES = ("guard", "executor", "breaker", "worker:research", "worker:coding", "worker:writing")
NOW = datetime(2026, 12, 2, 12, 30, tzinfo=UTC)


def planned(mode: str = "centralized", **plan) -> TaskSpec:
    return TaskSpec(agent="writing", prompt=REQUEST, max_tokens=64, orchestration=mode,
                    plan=Plan(subtasks=PARTS, **plan))


def with_budget(daily_tokens: int) -> Policy:
    policy = example_policy()
    limits = BudgetLimits(daily_tokens=daily_tokens, hourly_tokens=daily_tokens)
    return msgspec.structs.replace(policy, defaults=msgspec.structs.replace(policy.defaults, budget=limits))


def test_an_extension_is_held_once_per_part_and_refused_past_a_window_or_after_the_task_ended():
    limits = BudgetLimits(daily_tokens=1_000, hourly_tokens=1_000)
    account = Account()
    assert ledger.reserve(account, "t", 600, limits, NOW, "user") is None
    assert ledger.extend(account, "t", "p1", 300, limits, NOW, "user") == 300
    assert ledger.extend(account, "t", "p1", 50, limits, NOW, "user") == 300  # asked again: the first amount
    assert account.reserved == 900
    refusal = ledger.extend(account, "t", "p2", 200, limits, NOW, "user")
    assert (refusal.window, refusal.remaining) == ("day", 100)
    ledger.unextend(account, "t", "p1")
    assert account.reserved == 600
    ledger.close(account, "t")
    assert ledger.extend(account, "t", "p3", 10, limits, NOW, "user").window == "ended"


def test_an_extension_never_takes_a_task_past_its_per_task_cap():
    limits = BudgetLimits(daily_tokens=10_000, hourly_tokens=10_000, per_task_tokens=1_000)
    account = Account()
    ledger.reserve(account, "t", 800, limits, NOW, "user")
    refusal = ledger.extend(account, "t", "p1", 300, limits, NOW, "user")
    assert (refusal.window, refusal.remaining) == ("task", 200)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["centralized", "distributed", "hybrid"])
async def test_subtasks_past_the_reservation_reserve_more_first_so_no_step_goes_beyond_it(settings, tenant, user,
                                                                                          mode):
    async with stack(settings, policy=example_policy()) as client:
        end = await client.run(planned(mode), tenant=tenant, user=user)
        cost = await wait_until(lambda: _finished(client, end.task_id, tenant))
    assert isinstance(end, TaskCompleted), end
    assert cost.tokens > cost.reserved_tokens  # the parts took more than the task reserved at admission…
    assert [s.over_reservation for s in cost.steps] == [0] * len(PARTS + [None])  # …and each had it reserved first


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["centralized", "distributed", "hybrid"])
async def test_a_subtask_the_budget_cannot_cover_fails_the_task_over_budget_and_says_why(settings, tenant, user,
                                                                                         mode):
    async with stack(settings, policy=with_budget(daily_tokens=2_500)) as client:
        end = await client.run(planned(mode), tenant=tenant, user=user)
        shown = await wait_until(lambda: _settled_budget(client, tenant, user))
    assert isinstance(end, TaskFailed), end
    assert end.reason == "over_budget"
    assert "needs" in end.error and "more than the task reserved" in end.error and "daily budget" in end.error
    day = next(w for w in shown.windows if w.scope == "user" and w.window == "day")
    assert day.used <= day.limit


@pytest.mark.integration
@pytest.mark.fault
async def test_many_subtasks_finishing_at_once_on_three_budget_replicas_never_overspend(
        settings, tenant, user, tmp_path):
    limit, tasks = 30_000, 12  # each task takes about 4,500 tokens: about half of them fit
    await apply(settings, with_budget(daily_tokens=limit))
    replicas = services(settings, tmp_path / "logs")
    try:
        for name in ("budget", "budget", "budget", *SERVICES):
            replicas.start_one(*name.split(":"))
        async with Client.connect(settings, "test") as client:
            await client.wait_ready([f"corral-{name.replace(':', '-')}" for name in SERVICES], timeout=60)
            await wait_until(lambda: _replicas(client, "corral-budget", 3), timeout=30)
            ends: list = []

            async def one(n: int) -> None:
                ends.append(await client.run(planned(on_failure="best_effort"), tenant=tenant, user=user,
                                             task_id=f"m{n}", timeout=90))

            async with anyio.create_task_group() as tg:
                for n in range(tasks):
                    tg.start_soon(one, n)
            shown = await wait_until(lambda: _settled_budget(client, tenant, user), timeout=30)
            costs = [await client.cost(end.task_id, tenant=tenant) for end in ends]
    finally:
        replicas.stop()
    day = next(w for w in shown.windows if w.scope == "user" and w.window == "day")
    completed = [end for end in ends if isinstance(end, TaskCompleted)]
    assert len(ends) == tasks and completed and len(completed) < tasks  # the budget ran out part of the way
    assert day.used <= limit  # never overspent…
    assert day.used == sum(c.tokens for c in costs)  # …every step billed once, in the journals as in the account
    assert all(s.over_reservation == 0 for c in costs for s in c.steps)  # each part was covered before it ran


async def _finished(client: Client, task_id: str, tenant: str):
    cost = await client.cost(task_id, tenant=tenant)
    return cost if cost.status == "finished" else None


async def _settled_budget(client: Client, tenant: str, user: str):
    """The user's budget once no task holds anything in it."""
    shown = await client.budget(tenant, user)
    return shown if shown.open_tasks == 0 and all(w.reserved == 0 for w in shown.windows) else None


async def _replicas(client: Client, name: str, count: int) -> bool:
    return (await client.running_services()).get(name, 0) >= count
