"""`orchestration.max_parallel_per_tenant`: a tenant's subtasks running at once, over every task and every
coordinator (the executor, the pools), on a real nats-server."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from contracts import StepCompleted, TaskCompleted, TaskSpec
from contracts import subjects
from contracts.events import Plan, Subtask
from contracts.policy import OrchestrationLimits
from shared import slots
from shared.bus import Bus
from tests.conftest import stack
from tests.signals import example_policy, signals
from tests.test_poison import GARBAGE, dead_letters

pytestmark = [pytest.mark.anyio]
PARTS = [Subtask(id=f"p{n}", agent=agent, instruction=f"Do part {n}.")
         for n, agent in enumerate(["research", "coding", "writing"])]


def test_a_slot_is_given_while_the_tenant_has_one_free_and_a_holder_asking_again_keeps_its_own():
    held = slots.TenantSlots()
    assert slots.take(held, "a", until=100.0, now=0.0, limit=2)
    assert slots.take(held, "b", until=100.0, now=0.0, limit=2)
    assert not slots.take(held, "c", until=100.0, now=0.0, limit=2)
    assert slots.take(held, "a", until=150.0, now=0.0, limit=2)  # its own: renewed, not a second slot
    assert held.held == {"a": 150.0, "b": 100.0}
    slots.give_back(held, "b")
    assert slots.take(held, "c", until=100.0, now=0.0, limit=2)


def test_a_slot_whose_holder_never_gave_it_back_lapses_at_its_time():
    held = slots.TenantSlots(held={"dead": 10.0, "alive": 100.0})
    assert slots.take(held, "new", until=100.0, now=50.0, limit=2)
    assert set(held.held) == {"alive", "new"}


def most_at_once(steps: list[StepCompleted]) -> int:
    """The most steps that ran at the same moment (each from its start, its end less its latency, to its end)."""
    edges = sorted([(s.occurred_at.timestamp() - s.latency_ms / 1000, 1) for s in steps]
                   + [(s.occurred_at.timestamp(), -1) for s in steps], key=lambda edge: (edge[0], edge[1]))
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["centralized", "distributed"])
async def test_a_tenants_subtasks_over_every_task_run_no_more_at_once_than_its_limit(settings, tenant, user, mode):
    limits = OrchestrationLimits(max_parallel=4, max_parallel_per_tenant=2)
    policy = msgspec.structs.replace(example_policy(), orchestration=limits)
    spec = TaskSpec(agent="writing", prompt="Ship it.", orchestration=mode, plan=Plan(subtasks=PARTS))
    ends: list = []
    async with stack(settings.with_changes(sim_latency_s=0.4), policy=policy) as client, signals(client) as heard:
        async def one() -> None:
            ends.append(await client.run(spec, tenant=tenant, user=user, timeout=60))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        parts = [s for s in heard.of(StepCompleted, user=user) if "-=synthesis-" not in s.step_id
                 and "-synthesis-" not in s.step_id]
    assert len(ends) == 3 and all(isinstance(end, TaskCompleted) for end in ends), ends
    assert len(parts) == 3 * len(PARTS)
    assert most_at_once(parts) == 2  # as many as the tenant may, and never more, though each task may run 4


@pytest.mark.integration
async def test_a_tenants_slots_record_that_does_not_decode_is_set_aside_and_its_plans_still_run(
        settings, tenant, user):
    spec = TaskSpec(agent="writing", prompt="Ship it.", orchestration="centralized", plan=Plan(subtasks=PARTS))
    async with Bus.connect(settings, "test-poison") as bus:
        revision = await (await bus.bucket(subjects.KV_SLOTS)).put(tenant, GARBAGE)
        async with stack(settings, policy=example_policy()) as client:
            end = await client.run(spec, tenant=tenant, user=user)
        letters = [l for l in await dead_letters(bus.js) if l.subject == f"$KV.{subjects.KV_SLOTS}.{tenant}"]
        held = await slots.slots_bucket(await bus.bucket(subjects.KV_SLOTS)).bucket.get(tenant)
    assert isinstance(end, TaskCompleted), end
    assert [l.payload for l in letters] == [GARBAGE] and f"revision {revision} does not decode" in letters[0].reason
    assert held is not None and held.held == {}  # every slot taken was given back
