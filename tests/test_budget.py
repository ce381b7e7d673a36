"""Budgets on a real nats-server: replicas never overspend, a step is billed once, windows roll,
reservations are released or expire, thresholds notify once, and the CLI shows it all."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest

from contracts import (
    CostNotice,
    StepCompleted,
    StepFailed,
    TaskAdmitted,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TaskSpec,
    TaskValidated,
    TokenEstimate,
    Usage,
    subjects,
)
from contracts.commands import SimulateDependency
from contracts.policy import AgentPolicy, BudgetLimits, Defaults, Policy, Strategy, TenantPolicy, ToolRules
from services.budget.handlers import tenant_key, user_key
from services.budget.ledger import Account
from services.client import Client
from shared.bus import Bus
from shared.config import Settings
from shared.streams import consumer_config, declare_consumer
from tests.conftest import Clock, apply, operator_env, services, signed_in_as, stack, wait_until
from tests.signals import example_policy, signals

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ROOMY = BudgetLimits(daily_tokens=100_000, hourly_tokens=100_000)


def validated(task_id: str, tenant: str, user: str, estimate: int) -> TaskValidated:
    return TaskValidated(task_id=task_id, tenant=tenant, user=user, spec=TaskSpec(agent="research", prompt="p"),
                         estimate=TokenEstimate(prompt_tokens=estimate // 2, max_output_tokens=estimate - estimate // 2))


def completed_step(task_id: str, tenant: str, user: str, n: int, input_tokens: int, output_tokens: int,
                   model: str = "sim-large") -> StepCompleted:
    return StepCompleted(task_id=task_id, tenant=tenant, user=user, step_id=f"{task_id}-a{n}", attempt=n,
                         agent="research", dependency=f"simulated/{model}", model=model, output="ok",
                         usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens), latency_ms=1.0)


def finished(task_id: str, tenant: str, user: str, usage: Usage) -> TaskCompleted:
    return TaskCompleted(task_id=task_id, tenant=tenant, user=user, output="ok", usage=usage, attempts=1,
                         model="sim-large")


@asynccontextmanager
async def budget(settings: Settings, policy: Policy | None = None, clock=None) -> AsyncIterator[Client]:
    """One budget replica in this event loop (with `clock` if given; else a `mid_window_clock()`), and a
    client once it answers."""
    async with stack(settings, "budget", policy=policy, clocks={"budget": clock} if clock else None) as client:
        yield client


async def decide(client: Client, task: TaskValidated) -> TaskAdmitted | TaskRejected:
    """Publish a validated task and wait for the budget's decision."""
    async with client.events() as events:
        await client.bus.emit(subjects.task_validated(task.tenant), task)
        with anyio.fail_after(10):
            async for event in events:
                if isinstance(event, (TaskAdmitted, TaskRejected)) and event.task_id == task.task_id:
                    return event
    raise AssertionError("no decision")


async def publish_copies(client: Client, subject: str, event, copies: int) -> None:
    """Publish `copies` copies that escape the stream's de-duplication, as after its window."""
    for n in range(copies):
        await client.bus.js.publish(subject, msgspec.json.encode(event),
                                    headers={subjects.HEADER_MSG_ID: f"copy-{n}-{event.dedup_key()}"})


async def settled(client: Client, task_id: str, tokens: int, tenant: str = "default"):
    """The task's cost once the budget has posted `tokens` and closed it; None until then."""
    reply = await client.cost(task_id, tenant=tenant)
    return reply if reply.status in ("finished", "expired") and reply.tokens == tokens else None


def window(reply, scope: str, name: str):
    return next(w for w in reply.windows if w.scope == scope and w.window == name)


async def _replicas(client: Client, name: str, count: int) -> bool:
    return (await client.running_services())[name] >= count


async def test_fifty_concurrent_admissions_across_three_budget_replicas_never_exceed_the_limit_nor_starve(
        settings, tenant, user, tmp_path):
    limit = 10_000
    await apply(settings, Policy(defaults=Defaults(budget=BudgetLimits(daily_tokens=limit, hourly_tokens=limit))))
    estimates = {f"c{n}": random.Random(n).randint(300, 900) for n in range(50)}  # ~30,000 asked for 10,000
    replicas = services(settings, tmp_path / "logs")
    try:
        for _ in range(3):
            replicas.start_one("budget")
        async with Client.connect(settings, "test") as client, client.events() as events:
            await wait_until(lambda: _replicas(client, "corral-budget", 3), timeout=30)
            async with anyio.create_task_group() as tg:
                for task_id, estimate in estimates.items():
                    tg.start_soon(client.bus.emit, subjects.task_validated(tenant),
                                  validated(task_id, tenant, user, estimate))
            decided: dict[str, TaskAdmitted | TaskRejected] = {}
            with anyio.fail_after(60):
                async for event in events:
                    if isinstance(event, (TaskAdmitted, TaskRejected)) and event.user == user:
                        decided[event.task_id] = event
                        if len(decided) == len(estimates):
                            break
            shown = await client.budget(tenant, user)
    finally:
        replicas.stop()
    admitted = sum(e.reserved_tokens for e in decided.values() if isinstance(e, TaskAdmitted))
    rejected = [e for e in decided.values() if isinstance(e, TaskRejected)]
    assert admitted <= limit
    assert rejected and all(e.reason == "over_budget" for e in rejected)
    assert all(estimates[e.task_id] > limit - admitted for e in rejected)  # each refused task really did not fit
    assert window(shown, "user", "day").reserved == admitted  # the holds are exactly what was admitted


async def test_a_step_completion_delivered_three_times_is_billed_once(settings, tenant, user):
    async with budget(settings) as client:
        assert isinstance(await decide(client, validated("b1", tenant, user, 500)), TaskAdmitted)
        await publish_copies(client, subjects.step_completed(tenant), completed_step("b1", tenant, user, 1, 20, 80), 3)
        await wait_until(lambda: _all_acked(client, subjects.CONSUMER_BUDGET_USAGE, 3))
        cost, shown = await client.cost("b1"), await client.budget(tenant, user)
    assert [(s.step_id, s.usage.total) for s in cost.steps] == [("b1-a1", 100)]
    assert (window(shown, "user", "day").used, window(shown, "user", "hour").used) == (100, 100)
    assert window(shown, "user", "day").reserved == 400
    assert window(shown, "tenant", "day").used == 100


async def _all_acked(client: Client, durable: str, at_least: int) -> bool:
    stream = subjects.STREAM_STEPS if durable == subjects.CONSUMER_BUDGET_USAGE else subjects.STREAM_TASKS
    info = await client.bus.js.consumer_info(stream, durable)
    return info.delivered.stream_seq >= at_least and info.num_ack_pending == 0 and info.num_pending == 0


async def test_the_billed_total_equals_the_sum_of_actual_usage_over_a_demo_run(settings, tenant):
    people = [f"demo-{n}" for n in range(3)]
    prompts = ["Summarise the incident", "Draft a retry policy [sim:flaky=1]", "Plan the migration",
               "Review the tests [sim:fail=permanent]"]
    async with stack(settings, policy=Policy(defaults=Defaults(budget=ROOMY))) as client:
        ends = []

        async def one(user: str, prompt: str, agent: str) -> None:
            ends.append(await client.run(TaskSpec(agent=agent, prompt=prompt), tenant=tenant, user=user))

        async with anyio.create_task_group() as tg:
            for n, (user, prompt) in enumerate((u, p) for u in people for p in prompts):
                tg.start_soon(one, user, prompt, ("research", "coding", "writing")[n % 3])
        done = [e for e in ends if isinstance(e, TaskCompleted)]
        for end in ends:
            await wait_until(lambda: settled(client, end.task_id, end.usage.total if end in done else 0))
        shown = {user: await client.budget(tenant, user) for user in people}
    assert len(done) == len(people) * 3 and len(ends) == len(people) * len(prompts)
    for user in people:
        spent = sum(e.usage.total for e in done if e.user == user)
        assert window(shown[user], "user", "day").used == spent
        assert window(shown[user], "user", "day").reserved == 0


async def test_a_task_its_tenant_cannot_afford_is_rejected_and_the_users_hold_is_given_back(settings, user):
    tenant = "acme"
    tight_tenant = Policy(defaults=Defaults(budget=ROOMY),
                          tenants={tenant: TenantPolicy(tenant_budget=BudgetLimits(daily_tokens=10_000,
                                                                                   hourly_tokens=1_000))})
    async with budget(settings, tight_tenant) as client:
        first = await decide(client, validated("t1", tenant, "someone-else", 800))
        second = await decide(client, validated("t2", tenant, user, 500))
        shown = await client.budget(tenant, user)
    assert isinstance(first, TaskAdmitted)
    assert isinstance(second, TaskRejected) and second.reason == "over_budget"
    assert "tenant's hourly budget of 1,000 tokens: 200 left" in second.message
    assert second.remaining_tokens == 200 and second.resets_at is not None
    assert window(shown, "user", "hour").reserved == 0 and shown.open_tasks == 0
    assert window(shown, "tenant", "hour").reserved == 800


async def test_a_tenant_with_too_many_tasks_running_takes_no_new_one_until_some_finish(settings, user):
    tenant, people = "crowd", [f"{user}-{n}" for n in range(60)]
    small_accounts = settings.with_changes(budget_account_max_bytes=1_500)  # a few holds' worth
    async with budget(small_accounts, Policy(defaults=Defaults(budget=ROOMY, tenant_budget=ROOMY))) as client:
        decisions = []
        for n, person in enumerate(people):
            decisions.append(await decide(client, validated(f"crowd-{n}", tenant, person, 100)))
            if isinstance(decisions[-1], TaskRejected):
                break
        running = decisions[:-1]
        step = completed_step(running[0].task_id, tenant, people[0], 1, 20, 30)  # still billed when crowded
        await client.bus.emit(subjects.step_completed(tenant), step)
        nothing = Usage(input_tokens=0, output_tokens=0)
        for n, task in enumerate(running):
            usage = step.usage if n == 0 else nothing
            await client.bus.emit(subjects.task_completed(tenant), finished(task.task_id, tenant, people[n], usage))
        first = await wait_until(lambda: settled(client, running[0].task_id, 50, tenant))
        await wait_until(lambda: settled(client, running[-1].task_id, 0, tenant))
        after = await decide(client, validated("crowd-after", tenant, people[-1], 100))
    refused = decisions[-1]
    assert all(isinstance(task, TaskAdmitted) for task in running) and 5 <= len(running) < len(people) - 1
    assert isinstance(refused, TaskRejected) and refused.reason == "rate_limited" and refused.retry_after_s == 30
    assert "your tenant has too many tasks running at once" in refused.message and "at most 1,500" in refused.message
    assert first.tokens == 50
    assert isinstance(after, TaskAdmitted)


async def test_a_task_over_the_per_task_cap_is_rejected_however_much_remains(settings, tenant, user):
    capped = Policy(defaults=Defaults(budget=BudgetLimits(daily_tokens=100_000, hourly_tokens=100_000,
                                                          per_task_tokens=400)))
    async with budget(settings, capped) as client:
        refused = await decide(client, validated("p1", tenant, user, 500))
        admitted = await decide(client, validated("p2", tenant, user, 400))
        shown = await client.budget(tenant, user)
    assert isinstance(refused, TaskRejected) and refused.reason == "over_budget"
    assert "your limit per task is 400" in refused.message and refused.resets_at is None
    assert isinstance(admitted, TaskAdmitted)
    assert shown.per_task_tokens == 400 and window(shown, "user", "day").reserved == 400


async def test_the_hourly_window_resets_at_rollover_and_the_daily_one_does_not(settings, tenant, user):
    clock = Clock(datetime(2026, 11, 27, 13, 59, 50, tzinfo=UTC))
    async with budget(settings, clock=clock) as client:  # the seed's defaults: 10,000 a day, 1,000 an hour
        assert isinstance(await decide(client, validated("w1", tenant, user, 800)), TaskAdmitted)
        await client.bus.emit(subjects.step_completed(tenant), completed_step("w1", tenant, user, 1, 300, 400))
        await client.bus.emit(subjects.task_completed(tenant), finished("w1", tenant, user, Usage(input_tokens=300,
                                                                                                  output_tokens=400)))
        await wait_until(lambda: settled(client, "w1", 700))
        refused = await decide(client, validated("w2", tenant, user, 800))
        clock.now += timedelta(seconds=15)  # 14:00:05
        admitted = await decide(client, validated("w3", tenant, user, 800))
        shown = await client.budget(tenant, user)
    assert isinstance(refused, TaskRejected) and refused.remaining_tokens == 300
    assert refused.resets_at == datetime(2026, 11, 27, 14, 0, tzinfo=UTC)
    assert isinstance(admitted, TaskAdmitted)
    assert (window(shown, "user", "hour").start, window(shown, "user", "hour").used) == ("2026-11-27T14", 0)
    assert (window(shown, "user", "day").start, window(shown, "user", "day").used) == ("2026-11-27", 700)
    assert window(shown, "user", "hour").remaining == 1_000 - 800


async def test_each_threshold_notifies_once_per_window_whatever_the_redeliveries(settings, tenant, user):
    async with budget(settings) as client:  # 1,000 tokens an hour: steps of 300, 300, 250, 200 cross 50, 80, 100 %
        assert isinstance(await decide(client, validated("n1", tenant, user, 1_000)), TaskAdmitted)
        steps = [completed_step("n1", tenant, user, n, 100, tokens - 100) for n, tokens in
                 enumerate((300, 300, 250, 200), start=1)]
        for step in steps:
            await publish_copies(client, subjects.step_completed(tenant), step, 2)
        total = Usage(input_tokens=400, output_tokens=650)  # what the task's end reports: all its steps
        await client.bus.emit(subjects.task_completed(tenant), finished("n1", tenant, user, total))
        await wait_until(lambda: settled(client, "n1", 1_050))
        await wait_until(lambda: _all_acked(client, subjects.CONSUMER_BUDGET_USAGE, 8))
        notices = await wait_until(lambda: _stored_notices(client, tenant, user, 4))  # 3 thresholds + the task's
    thresholds = sorted((n.window, n.threshold_pct) for n in notices if n.reason == "threshold")
    assert thresholds == [("hour", 50), ("hour", 80), ("hour", 100)]
    task_notice = next(n for n in notices if n.reason == "task")
    assert (task_notice.tokens, task_notice.remaining_hourly_tokens) == (1_050, -50)
    assert task_notice.cost_usd > 0


async def test_a_step_that_arrives_after_its_tasks_end_is_billed_once_and_leaves_no_hold(settings, tenant, user):
    async with budget(settings) as client:
        assert isinstance(await decide(client, validated("e1", tenant, user, 500)), TaskAdmitted)
        step = completed_step("e1", tenant, user, 1, 40, 60)
        await client.bus.emit(subjects.task_completed(tenant), finished("e1", tenant, user, step.usage))
        await wait_until(lambda: _status(client, "e1", "finished"))
        await publish_copies(client, subjects.step_completed(tenant), step, 2)
        cost = await wait_until(lambda: settled(client, "e1", 100))
        notices = await wait_until(lambda: _stored_notices(client, tenant, user, 1))
        await wait_until(lambda: _all_acked(client, subjects.CONSUMER_BUDGET_USAGE, 2))
        shown = await client.budget(tenant, user)
        kv = await client.bus.js.key_value(subjects.KV_BUDGET)
        holds = [msgspec.json.decode((await kv.get(key)).value, type=Account).holds
                 for key in (user_key(tenant, user), tenant_key(tenant))]
        stats = msgspec.json.decode((await client.bus.nc.request(subjects.service_stats("budget"), b"")).data)
    assert holds == [{}, {}]
    assert stats["late_steps"] == 2  # both copies came after the release began (what the bench counts)
    assert [(s.step_id, s.usage.total) for s in cost.steps] == [("e1-a1", 100)]
    assert window(shown, "user", "day").used == 100 and window(shown, "tenant", "day").used == 100
    assert window(shown, "user", "day").reserved == 0 and shown.open_tasks == 0
    assert [(n.reason, n.tokens) for n in notices] == [("task", 100)]


async def _stored_notices(client: Client, tenant: str, user: str, at_least: int) -> list[CostNotice] | None:
    """Every CostNotice the stream stored for the user (what a durable subscriber receives)."""
    subject = subjects.cost_notice(tenant, user)
    info = await client.bus.js.stream_info(subjects.STREAM_SIGNALS, subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if count < at_least:
        return None
    sub = await client.bus.js.pull_subscribe(subject, stream=subjects.STREAM_SIGNALS)
    try:
        msgs = await sub.fetch(count, timeout=5)
    finally:
        await sub.unsubscribe()
    return [msgspec.json.decode(m.data, type=CostNotice) for m in msgs]


async def test_a_reservation_whose_task_never_finishes_expires_and_a_late_step_is_still_billed_once(
        settings, tenant, user):
    quick = settings.with_changes(budget_hold_timeout_s=1.0, budget_sweep_s=0.2)
    async with budget(quick) as client:
        assert isinstance(await decide(client, validated("x1", tenant, user, 600)), TaskAdmitted)
        expired = await wait_until(lambda: _status(client, "x1", "expired"))
        shown = await client.budget(tenant, user)
        await publish_copies(client, subjects.step_completed(tenant), completed_step("x1", tenant, user, 1, 50, 50), 2)
        await client.bus.emit(subjects.task_completed(tenant), finished("x1", tenant, user, Usage(input_tokens=50,
                                                                                                  output_tokens=50)))
        late = await wait_until(lambda: _status(client, "x1", "finished"))  # "expired" until its end is handled
        after = await client.budget(tenant, user)
    assert expired.tokens == 0 and window(shown, "user", "hour").reserved == 0 and shown.open_tasks == 0
    assert late.tokens == 100 and [s.over_reservation for s in late.steps] == [0]
    assert window(after, "user", "hour").used == 100 and window(after, "user", "hour").reserved == 0


async def _status(client: Client, task_id: str, status: str):
    reply = await client.cost(task_id)
    return reply if reply.status == status else None


async def test_budget_show_and_cost_print_what_the_budget_service_booked(settings, tenant, user):
    async with budget(settings) as client:
        assert isinstance(await decide(client, validated("c1", tenant, user, 500)), TaskAdmitted)
        await client.bus.emit(subjects.step_completed(tenant), completed_step("c1", tenant, user, 1, 120, 380))
        await client.bus.emit(subjects.task_completed(tenant), finished("c1", tenant, user,
                                                                        Usage(input_tokens=120, output_tokens=380)))
        await wait_until(lambda: settled(client, "c1", 500))
        show = await _corral(settings, "budget", "show", user, "--tenant", tenant)
        cost = await _corral(settings, "cost", "c1")
        unknown = await _corral(settings, "cost", "no-such-task", check=False)
    assert f"Budget of {user} (tenant {tenant})" in show
    #                      window                    limit      used    reserved  remaining  cost
    assert re.search(r"│ user\s+│ hour \S+\s+│\s+1,000 │\s+500 │\s+0 │\s+500 │ \$0\.0061 │", show), show
    assert re.search(r"│ tenant\s+│ day \S+\s+│\s+1,000,000 │\s+500 │\s+0 │\s+999,500 │", show), show
    assert "task c1 (default/" in cost and "500 tokens" in cost and "finished" in cost
    assert "c1-a1" in cost and "sim-large" in cost and "$0.006060" in cost  # 120 x 0.003 + 380 x 0.015 per 1k
    assert unknown.returncode == 3 and "no record of task 'no-such-task'" in unknown.stdout


async def _corral(settings: Settings, *args: str, check: bool = True):
    argv = [sys.executable, "-m", "services.cli", *args, "--nats", settings.nats_url]
    done = await anyio.run_process(argv, check=False, env={**os.environ, **operator_env(settings), "COLUMNS": "160"})
    result = subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode(), done.stderr.decode())
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout
    return result


def failed_step(task_id: str, tenant: str, user: str, n: int, input_tokens: int, output_tokens: int) -> StepFailed:
    """A step whose model answered once, then failed (a tool's failure, an answer that failed validation)."""
    return StepFailed(task_id=task_id, tenant=tenant, user=user, step_id=f"{task_id}-a{n}", attempt=n,
                      agent="research", dependency="tool/search", error="permanent", message="the tool failed",
                      model="sim-large", usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens))


def task_failed(task_id: str, tenant: str, user: str, usage: Usage | None) -> TaskFailed:
    return TaskFailed(task_id=task_id, tenant=tenant, user=user, reason="permanent_error", error="failed",
                      attempts=[], usage=usage)


async def test_a_failed_steps_usage_is_billed_once_even_delivered_twice_and_its_tasks_failure_settles_it(
        settings, tenant, user):
    async with budget(settings) as client:
        assert isinstance(await decide(client, validated("f1", tenant, user, 500)), TaskAdmitted)
        step = failed_step("f1", tenant, user, 1, 30, 70)
        await publish_copies(client, subjects.step_failed(tenant), step, 2)
        await wait_until(lambda: _drained(client, subjects.CONSUMER_BUDGET_USAGE))
        await client.bus.emit(subjects.task_failed(tenant), task_failed("f1", tenant, user, step.usage))
        cost = await wait_until(lambda: settled(client, "f1", 100))
        shown = await client.budget(tenant, user)
    assert [(s.step_id, s.usage.total, s.failed) for s in cost.steps] == [("f1-a1", 100, "permanent")]
    assert cost.cost_usd > 0
    assert window(shown, "user", "day").used == 100 and window(shown, "tenant", "day").used == 100
    assert window(shown, "user", "day").reserved == 0 and shown.open_tasks == 0


async def test_a_budget_started_over_the_older_usage_consumer_widens_its_filter_and_bills_failed_steps(
        settings, tenant, user):
    async with Bus.connect(signed_in_as(settings, "budget"), "budget") as old:  # as an older budget left it
        await declare_consumer(old.js, subjects.STREAM_STEPS,
                               consumer_config(settings, subjects.CONSUMER_BUDGET_USAGE, subjects.ALL_STEP_COMPLETED))
        before = await old.js.consumer_info(subjects.STREAM_STEPS, subjects.CONSUMER_BUDGET_USAGE)
    assert (before.config.filter_subjects or [before.config.filter_subject]) == [subjects.ALL_STEP_COMPLETED]
    async with budget(settings) as client:
        info = await client.bus.js.consumer_info(subjects.STREAM_STEPS, subjects.CONSUMER_BUDGET_USAGE)
        assert sorted(info.config.filter_subjects) == sorted([subjects.ALL_STEP_COMPLETED, subjects.ALL_STEP_FAILED])
        assert isinstance(await decide(client, validated("u1", tenant, user, 500)), TaskAdmitted)
        await client.bus.emit(subjects.step_failed(tenant), failed_step("u1", tenant, user, 1, 10, 40))
        await client.bus.emit(subjects.step_completed(tenant), completed_step("u1", tenant, user, 2, 20, 30))
        await client.bus.emit(subjects.task_completed(tenant),
                              finished("u1", tenant, user, Usage(input_tokens=30, output_tokens=70)))
        cost = await wait_until(lambda: settled(client, "u1", 100))
    assert sorted((s.step_id, s.usage.total, s.failed) for s in cost.steps) == [
        ("u1-a1", 50, "permanent"), ("u1-a2", 50, "")]


async def test_a_step_that_fails_after_one_model_call_is_billed_once_through_the_pipeline_even_delivered_twice(
        settings, tenant, user):
    chain = [Strategy(provider="simulated", model="sim-large", tier="standard", max_attempts=1)]
    policy = msgspec.structs.replace(
        example_policy(), agents={"searcher": AgentPolicy(chain=chain)},
        defaults=msgspec.structs.replace(example_policy().defaults, tools=ToolRules(allowed=["search"])))
    async with stack(settings, "guard", "budget", "executor", "breaker", "worker:searcher",
                     policy=policy) as client, signals(client) as heard:
        await client.simulate(SimulateDependency(dependency="tool/search", mode="fail", error="permanent"), expect=1)
        end = await client.run(TaskSpec(agent="searcher", prompt="Find the runbook", tools=["search"]),
                               tenant=tenant, user=user)
        step = await heard.first(StepFailed, task_id=end.task_id)
        assert isinstance(end, TaskFailed) and step.usage is not None and step.usage.total > 0
        assert [c.dependency for c in step.calls] == ["simulated/sim-large", "tool/search"]
        assert end.usage == step.usage  # what the release waits for is what the budget posts
        cost = await wait_until(lambda: settled(client, end.task_id, step.usage.total))
        await publish_copies(client, subjects.step_failed(tenant), step, 1)  # delivered again, after the end
        await wait_until(lambda: _drained(client, subjects.CONSUMER_BUDGET_USAGE))
        again, shown = await client.cost(end.task_id), await client.budget(tenant, user)
    assert [(s.step_id, s.usage, s.failed) for s in cost.steps] == [(step.step_id, step.usage, "permanent")]
    assert again.tokens == cost.tokens == step.usage.total and len(again.steps) == 1
    assert window(shown, "user", "day").used == step.usage.total


async def _drained(client: Client, durable: str) -> bool:
    """The budget's consumer has taken and acknowledged everything published to it so far."""
    info = await client.bus.js.consumer_info(subjects.STREAM_STEPS, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0
