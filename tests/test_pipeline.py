"""A task's whole journey, through every service, on a real nats-server."""

from __future__ import annotations

import anyio
import pytest

from contracts import TaskAdmitted, TaskCompleted, TaskFailed, TaskRejected, TaskSpec, subjects
from contracts.events import task_ref
from contracts.policy import BudgetLimits, Defaults, Limits, Policy
from services.budget.handlers import task_key
from shared.tokens import count_tokens
from tests.conftest import stack, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_submitted_task_reaches_completed_with_its_usage(settings, tenant, user):
    async with stack(settings) as client:
        end = await client.run(TaskSpec(agent="research", prompt="Summarise the design"), tenant=tenant, user=user)
    assert isinstance(end, TaskCompleted), end
    assert end.output.startswith("[simulated sim-large]")
    # billed like a chat API: one user message with its overhead (3 + role + content), plus reply priming (3)
    assert end.usage.input_tokens == 3 + count_tokens("user") + count_tokens("Summarise the design") + 3
    assert end.usage.output_tokens > 0
    assert end.attempts == 1


@pytest.mark.parametrize(("spec", "tenant_name", "reason", "words"), [
    (TaskSpec(agent="painter", prompt="paint"), "default", "unknown_agent", "'painter'"),
    (TaskSpec(agent="research", prompt="   "), "default", "invalid_request", "prompt is empty"),
    (TaskSpec(agent="research", prompt="x" * 40_000), "default", "payload_too_large", "40000 bytes"),
    (TaskSpec(agent="research", prompt="hi", max_tokens=999_999), "default", "invalid_request", "max_tokens"),
    (TaskSpec(agent="research", prompt="hi", tools=[f"t{i}" for i in range(20)]), "default", "invalid_request",
     "20 tools"),
    (TaskSpec(agent="research", prompt="hi"), "umbrella", "unknown_tenant", "'umbrella'"),
])
async def test_an_invalid_task_is_rejected_with_a_reason_that_says_what_to_fix(settings, user, spec, tenant_name,
                                                                               reason, words):
    async with stack(settings, "guard") as client:
        end = await client.run(spec, tenant=tenant_name, user=user, timeout=10)
    assert isinstance(end, TaskRejected)
    assert (end.reason, end.stage) == (reason, "guard")
    assert words in end.message


async def test_a_message_over_the_payload_limit_is_rejected_not_dropped(settings, tenant, user):
    small = settings.with_changes(max_payload_bytes=2048)
    async with stack(small, "guard", policy=Policy(limits=Limits(max_prompt_bytes=100_000))) as client:
        end = await client.run(TaskSpec(agent="research", prompt="y" * 4000), tenant=tenant, user=user, timeout=10)
    assert isinstance(end, TaskRejected) and end.reason == "payload_too_large"
    assert "limit is 2048" in end.message


async def test_a_transient_failure_is_retried_and_the_task_completes(settings, tenant, user):
    async with stack(settings) as client:
        progress = []
        end = await client.run(TaskSpec(agent="coding", prompt="fix it [sim:flaky=2]"), tenant=tenant, user=user,
                               on_progress=progress.append)
    assert isinstance(end, TaskCompleted), end
    assert end.attempts == 3
    assert [p.attempt for p in progress if p.stage == "retrying"] == [2, 3]


async def test_a_permanent_failure_is_not_retried_and_the_task_reports_it(settings, tenant, user):
    async with stack(settings) as client:
        end = await client.run(TaskSpec(agent="writing", prompt="write [sim:fail=permanent]"), tenant=tenant, user=user)
    assert isinstance(end, TaskFailed)
    assert end.reason == "permanent_error"
    assert len(end.attempts) == 1 and end.attempts[0].error == "permanent"
    assert end.error.startswith("All strategies failed. Last error: permanent: simulated permanent failure")


async def test_a_task_that_keeps_failing_transiently_fails_after_every_strategys_attempts_with_every_attempt(
        settings, tenant, user):
    async with stack(settings) as client:
        end = await client.run(TaskSpec(agent="research", prompt="q [sim:fail=timeout]"), tenant=tenant, user=user)
    assert isinstance(end, TaskFailed)
    assert end.reason == "attempts_exhausted"
    assert [a.step_id.rsplit("-", 1)[1] for a in end.attempts] == ["s0a1", "s0a2", "s0a3", "s1a1", "s1a2", "s1a3"]
    assert [a.tier for a in end.attempts] == ["advanced"] * 3 + ["fast"] * 3
    assert {a.error for a in end.attempts} == {"timeout"}
    assert end.error.startswith("All strategies failed. Last error: timeout: simulated timeout failure")


async def test_a_task_that_fits_the_budget_but_not_what_remains_is_rejected_by_the_budget(settings, tenant, user):
    tight = Policy(defaults=Defaults(budget=BudgetLimits(daily_tokens=1000, hourly_tokens=1000)))
    async with stack(settings, "guard", "budget", policy=tight) as client, client.events() as events:
        holder = TaskSpec(agent="research", prompt="hold the reservation", max_tokens=600)
        held = await client.submit(holder, tenant=tenant, user=user)  # reserves ~620 of 1,000
        with anyio.fail_after(10):  # and keeps them: no executor runs it
            admitted = await anext(e async for e in events
                                   if e.task_id == held and isinstance(e, (TaskAdmitted, TaskRejected)))
        end = await client.run(TaskSpec(agent="research", prompt="big", max_tokens=600), tenant=tenant, user=user)
    assert isinstance(admitted, TaskAdmitted)
    assert isinstance(end, TaskRejected)
    assert (end.reason, end.stage) == ("over_budget", "budget")
    assert "resets at" in end.message and end.retry_after_s and end.retry_after_s > 0
    # what is left after the holder's reservation, too little for ~600 more
    assert 0 < end.remaining_tokens < 600 and end.resets_at is not None and end.resets_at.minute == 0


async def test_status_reports_what_the_monitor_saw(settings, tenant, user):
    async with stack(settings) as client:
        await client.run(TaskSpec(agent="research", prompt="one"), tenant=tenant, user=user)
        await client.run(TaskSpec(agent="painter", prompt="two"), tenant=tenant, user=user)
        async def monitor_saw_both():
            report = await client.status()
            seen = report.counts.get("task.rejected") and report.counts.get("task.completed")
            return report if seen and "guard" in report.queue_depth else None  # depths are polled every second

        report = await wait_until(monitor_saw_both)
        task_state = await client.task_status("no-such-task")
    assert report.counts["task.completed"] == 1
    assert report.counts["task.rejected"] == 1
    assert report.latency.count == 1 and report.latency.p50_ms > 0
    assert report.tokens_last_hour > 0 and report.cost_usd > 0
    assert "guard" in report.queue_depth
    assert task_state.found is False


async def test_a_finished_tasks_records_and_its_idle_account_expire_so_the_buckets_do_not_grow_forever(settings, tenant, user):
    async with stack(settings) as client:
        end = await client.run(TaskSpec(agent="research", prompt="Summarise the design"), tenant=tenant, user=user)

        async def ttl_of(bucket: str, key: str) -> str | None:
            stored = await client.bus.js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}", direct=True)
            return (stored.headers or {}).get("Nats-TTL")

        journal_ttl = await wait_until(lambda: ttl_of(subjects.KV_BUDGET, task_key(tenant, end.task_id)))
        record_ttl = await ttl_of(subjects.KV_TASKS, task_ref(tenant, end.task_id))
        account_ttl = await wait_until(lambda: ttl_of(subjects.KV_BUDGET, f"acct.user.{tenant}.{user}"))
    assert isinstance(end, TaskCompleted), end
    assert int(journal_ttl) == 35 * 24 * 3600  # a month of `corral cost`
    assert int(record_ttl) == 8 * 24 * 3600  # a day past the longest an event of the task can come back
    assert int(account_ttl) == 2 * 24 * 3600  # released: it holds nothing, and its windows pass


async def test_a_client_can_wait_until_every_service_follows_a_new_policy_version(settings):
    from tests.conftest import apply

    names = ["corral-guard", "corral-budget", "corral-executor"]
    async with stack(settings, "guard", "budget", "executor") as client:
        version = await apply(settings, Policy(description="a new version"))
        await client.wait_policy(version, names)
        stats = [await client.replica_stats(name, expect=1) for name in names]
        assert all(reply[0]["endpoints"][0]["data"]["policy"]["version"] == version for reply in stats)
        with pytest.raises(TimeoutError):
            await client.wait_policy(version + 1, names, timeout=0.5)  # no such version: it never comes
