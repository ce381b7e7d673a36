"""Fallback chains, retries, timeouts and deadlines, on a real nats-server, with the example policy from docs/."""

from __future__ import annotations

import re
import time

import anyio
import msgspec
import pytest

from contracts import StepFailed, StepRequested, TaskAdmitted, TaskCompleted, TaskFailed, TaskSpec
from contracts.commands import SimulateDependency
from contracts.policy import AgentPolicy, Strategy
from services.executor.state import step_id
from shared.policy import load_policy_file
from tests.conftest import stack
from tests.signals import EXAMPLE_POLICY, example_policy, signals

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
WORKERS = 3  # one replica per agent kind in the stack


def test_the_readme_example_policy_has_a_chain_per_agent_and_breakers_per_dependency():
    policy = load_policy_file(EXAMPLE_POLICY)
    assert [s.tier for s in policy.agents["research"].chain] == ["advanced", "fast", "cached"]
    assert policy.agents["research"].chain[2].kind == "cache"
    assert policy.breaker_for("simulated/sim-large").window_type == "time"
    assert policy.breaker_for("tool/search").permitted_calls_in_half_open == 2
    assert policy.breaker_for("simulated/sim-small") == policy.breakers  # the seed's defaults
    assert (policy.breakers.minimum_calls, policy.breakers.wait_in_open_s) == (5, 60.0)


async def test_a_chain_completes_on_the_fast_tier_when_the_advanced_model_is_down_and_records_both_attempts(
        settings, tenant, user):
    async with stack(settings, policy=example_policy()) as client:
        acks = await client.simulate(SimulateDependency(dependency="simulated/sim-large", mode="fail"), WORKERS)
        assert len(acks) == WORKERS
        end = await client.run(TaskSpec(agent="research", prompt="Compare the tiers"), tenant=tenant, user=user)
        status = await client.task_status(end.task_id)
    assert isinstance(end, TaskCompleted), end
    assert (end.tier, end.strategy, end.dependency, end.attempts) == ("fast", 1, "simulated/sim-small", 3)
    assert end.output.startswith("[simulated sim-small]")
    assert [(a.step_id, a.tier, a.dependency, a.error) for a in status.attempts] == [
        (step_id(tenant, end.task_id, 0, 1), "advanced", "simulated/sim-large", "transient"),
        (step_id(tenant, end.task_id, 0, 2), "advanced", "simulated/sim-large", "transient"),
    ]
    assert "corral sim fail" in status.attempts[0].message


async def test_a_rate_limited_attempt_is_retried_no_sooner_than_its_retry_after(settings, tenant, user):
    prompt = "Summarise [sim:flaky=1] [sim:error=rate_limited] [sim:retry_after=0.8]"
    async with stack(settings, policy=example_policy()) as client, signals(client) as heard:
        end = await client.run(TaskSpec(agent="research", prompt=prompt), tenant=tenant, user=user)
        retried = await heard.first(StepRequested, step_id=step_id(tenant, end.task_id, 0, 2))
    assert isinstance(end, TaskCompleted) and (end.strategy, end.attempts) == (0, 2)
    failed = heard.of(StepFailed, step_id=step_id(tenant, end.task_id, 0, 1))[0]
    assert (failed.error, failed.retry_after_s) == ("rate_limited", 0.8)
    waited = (retried.occurred_at - failed.occurred_at).total_seconds()
    assert 0.8 <= waited < 5.0  # the example's backoff alone would wait at most 0.05 s


async def test_a_permanent_error_is_not_retried_and_each_strategy_is_tried_once(settings, tenant, user):
    async with stack(settings, policy=example_policy()) as client, signals(client) as heard:
        end = await client.run(TaskSpec(agent="research", prompt="q [sim:fail=permanent]"), tenant=tenant, user=user)
        requested = [e.step_id.rsplit("-", 1)[1] for e in heard.of(StepRequested, task_id=end.task_id)]
    assert isinstance(end, TaskFailed) and end.reason == "permanent_error"
    assert requested == ["s0a1", "s1a1"]  # advanced once, fast once: no retry of a permanent error
    assert [(a.tier, a.error) for a in end.attempts] == [("advanced", "permanent"), ("fast", "permanent"),
                                                         ("cached", "permanent")]
    assert end.error.startswith("All strategies failed. Last error: permanent: simulated permanent failure")


async def test_a_chain_that_ends_in_the_cache_answers_from_it_when_every_model_is_down(settings, tenant, user):
    spec = TaskSpec(agent="writing", prompt="Draft the release note")
    async with stack(settings, policy=example_policy()) as client:
        first = await client.run(spec, tenant=tenant, user=user)
        await client.simulate(SimulateDependency(dependency="simulated/sim-small", mode="fail", error="permanent"),
                              WORKERS)
        again = await client.run(spec, tenant=tenant, user=user)
    assert isinstance(first, TaskCompleted) and first.dependency == "simulated/sim-small"
    assert isinstance(again, TaskCompleted), again
    assert (again.dependency, again.tier, again.output) == ("cache", "cached", first.output)
    assert again.usage.total == 0


async def test_an_attempt_that_outlives_its_timeout_fails_as_a_timeout_and_the_next_strategy_answers(
        settings, tenant, user):
    chain = [Strategy(model="sim-large", tier="advanced", timeout_s=0.5, max_attempts=1),
             Strategy(model="sim-small", tier="fast", timeout_s=5)]
    policy = example_policy(agents={"research": AgentPolicy(chain=chain)})
    async with stack(settings, policy=policy) as client:
        await client.simulate(SimulateDependency(dependency="simulated/sim-large", mode="slow", latency_s=5),
                              WORKERS)
        end, took = await _run_from_admission(client, TaskSpec(agent="research", prompt="slow one"), tenant, user)
        status = await client.task_status(end.task_id)
    assert isinstance(end, TaskCompleted) and end.tier == "fast"
    assert [(a.error, a.dependency) for a in status.attempts] == [("timeout", "simulated/sim-large")]
    assert took < 4.0  # not the 5 s the slow model would have taken


async def test_a_step_no_worker_answers_is_timed_out_by_the_executor_sweep(settings, tenant, user):
    chain = [Strategy(model="sim-large", tier="advanced", timeout_s=0.3, max_attempts=1)]
    policy = example_policy(agents={"research": AgentPolicy(chain=chain)})
    async with stack(settings, "guard", "budget", "executor", policy=policy) as client:  # no research worker
        end = await client.run(TaskSpec(agent="research", prompt="anyone?"), tenant=tenant, user=user, timeout=20)
    assert isinstance(end, TaskFailed) and end.reason == "attempts_exhausted"
    assert end.attempts[0].error == "timeout" and "no worker answered" in end.attempts[0].message


async def test_the_task_deadline_bounds_the_whole_chain(settings, tenant, user):
    chain = [Strategy(model="sim-large", tier="advanced", timeout_s=10), Strategy(model="sim-small", tier="fast")]
    policy = example_policy(agents={"research": AgentPolicy(chain=chain, deadline_s=1.0)})
    async with stack(settings, policy=policy) as client:
        end, took = await _run_from_admission(client, TaskSpec(agent="research", prompt="[sim:latency=3]"), tenant,
                                              user)
    assert isinstance(end, TaskFailed) and end.reason == "deadline_exceeded"
    assert end.attempts[0].error == "timeout"
    assert took < 2.9  # the first attempt was cut at the deadline, not at its own 10 s timeout


async def _run_from_admission(client, spec: TaskSpec, tenant: str, user: str) -> tuple[object, float]:
    """The task's end, and the seconds from its admission to its end (by the events' stamps): what the
    timeouts and the deadline bound, without the time it took to reach the executor."""
    async with client.events() as events:
        end = await client.run(spec, tenant=tenant, user=user)
        with anyio.fail_after(5):  # heard before the end
            admitted = await anext(e async for e in events
                                   if e.task_id == end.task_id and isinstance(e, TaskAdmitted))
    return end, (end.occurred_at - admitted.occurred_at).total_seconds()



def test_the_step_id_names_tenant_task_strategy_and_attempt_and_is_a_valid_kv_key_and_subject_token():
    assert step_id("acme", "t-1", 2, 3) == "acme/t-1-s2a3"
    assert step_id("acme", "t-1", 2, 3) != step_id("globex", "t-1", 2, 3)  # two tenants' steps never meet
    assert re.fullmatch(r"[-/_=.a-zA-Z0-9]+", step_id("a-b", "0f3a-task_9", 11, 4))  # NATS KV key alphabet
    assert "." not in step_id("a-b", "0f3a-task_9", 11, 4)


async def test_a_task_running_when_the_executor_is_upgraded_still_completes(settings, tenant, user):
    from contracts import StepCompleted, TaskAdmitted, TokenEstimate, Usage, subjects

    spec = TaskSpec(agent="research", prompt="started before the upgrade")
    admitted = TaskAdmitted(task_id="old-1", tenant=tenant, user=user, spec=spec, reserved_tokens=10, window="d",
                            estimate=TokenEstimate(prompt_tokens=5, max_output_tokens=5))
    async with stack(settings, "executor") as client, client.events() as events:
        kv = await client.bus.bucket(subjects.KV_TASKS)  # the record as the executor before chains wrote it
        await kv.put("old-1", msgspec.json.encode({"task": admitted, "status": "running", "attempt": 1,
                                                   "attempts": [], "admitted_at": time.time()}))
        await client.bus.emit(subjects.step_completed(tenant), StepCompleted(
            task_id="old-1", tenant=tenant, user=user, step_id="old-1-a1", attempt=1, agent="research",
            dependency="simulated/sim-large", model="sim-large", output="done", latency_ms=1.0,
            usage=Usage(input_tokens=5, output_tokens=1)))
        with anyio.fail_after(10):
            end = await anext(e async for e in events if e.task_id == "old-1" and isinstance(e, TaskCompleted))
    assert (end.output, end.attempts, end.tier) == ("done", 1, "advanced")
