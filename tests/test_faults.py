"""Processes die; tasks do not. SIGKILL in the middle of work loses nothing and bills once."""

from __future__ import annotations

import uuid

import anyio
import pytest

from contracts import TaskAdmitted, TaskCompleted, TaskFailed, TaskProgress, TaskSpec, Usage, subjects, utcnow
from contracts.policy import DEFAULT_POLICY, Defaults, Policy
from services.budget.handlers import Budget, user_key
from services.budget.ledger import Account, TaskJournal
from services.client import Client
from services.executor.state import step_id
from shared.bus import Bus
from shared.kv import TypedBucket
from tests.conftest import apply, running, services, wait_until
from tests.test_budget import ROOMY, completed_step, finished, settled, validated

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.fault]
QUIET_S = 3.0  # after the end, how long we watch for a duplicate (longer than the 2 s ack wait)


async def test_a_worker_killed_mid_step_still_completes_the_task_exactly_once_and_bills_once(
        settings, tenant, user, tmp_path):
    workers = services(settings, tmp_path / "logs", env={"CORRAL_ACK_WAIT_S": "2"})
    try:
        by_pid = {proc.pid: proc for proc in (workers.start_one("worker", agent="research") for _ in range(2))}
        async with running(settings, "guard", "budget", "executor"), \
                Client.connect(settings, "test") as client, client.events() as events:
            await client.wait_ready({"corral-guard", "corral-budget", "corral-executor", "corral-worker-research"})
            task_id = await client.submit(TaskSpec(agent="research", prompt="slow one [sim:latency=1.5]"),
                                          tenant=tenant, user=user)
            completions: list[TaskCompleted] = []
            killed = None
            with anyio.move_on_after(30):
                async for event in events:
                    if event.task_id != task_id:
                        continue
                    if isinstance(event, TaskProgress) and event.stage == "step_started" and killed is None:
                        killed = int(event.worker.rsplit("-", 1)[1])
                        by_pid[killed].kill()  # SIGKILL while the model call is under way
                    if isinstance(event, TaskCompleted):
                        completions.append(event)
                        break
            with anyio.move_on_after(QUIET_S):  # a real wait: would a second completion show up?
                async for event in events:
                    if isinstance(event, TaskCompleted) and event.task_id == task_id:
                        completions.append(event)
            cost = await wait_until(lambda: settled(client, task_id, completions[0].usage.total))
            shown = await client.budget(tenant, user)
    finally:
        workers.stop()
    assert killed is not None, "the step never started"
    assert len(completions) == 1
    assert [s.step_id for s in cost.steps] == [step_id(tenant, task_id, strategy=0, attempt=1)]
    assert next(w for w in shown.windows if w.scope == "user" and w.window == "day").used == cost.tokens
    assert shown.open_tasks == 0  # released at the end


async def test_a_budget_killed_between_reserve_and_reconcile_bills_nothing_twice_after_restart(
        settings, tenant, user, tmp_path):
    await apply(settings, Policy(defaults=Defaults(budget=ROOMY)))
    env = {"CORRAL_ACK_WAIT_S": "2", "CORRAL_BUDGET_HOLD_TIMEOUT_S": "4", "CORRAL_BUDGET_SWEEP_S": "0.5"}
    budgets = services(settings, tmp_path / "logs", env=env)
    steps = {f"k{n}": completed_step(f"k{n}", tenant, user, 1, 20 + n, 100 + 7 * n) for n in range(20)}
    try:
        first = budgets.start_one("budget")
        async with Client.connect(settings, "test") as client, client.events() as events:
            await client.wait_ready({"corral-budget"})
            for task_id in [*steps, "never-ends"]:
                await client.bus.emit(subjects.task_validated(tenant), validated(task_id, tenant, user, 500))
            admitted = set()
            with anyio.fail_after(20):
                async for event in events:
                    if isinstance(event, TaskAdmitted) and event.user == user:
                        admitted.add(event.task_id)
                        if len(admitted) == len(steps) + 1:
                            break
            async with anyio.create_task_group() as tg:  # reconcile and release, all at once…
                for task_id, step in steps.items():
                    tg.start_soon(client.bus.emit, subjects.step_completed(tenant), step)
                    tg.start_soon(client.bus.emit, subjects.task_completed(tenant),
                                  finished(task_id, tenant, user, step.usage))
            first.kill()  # …and SIGKILL the budget while it works through them
            budgets.start_one("budget")
            await client.wait_ready({"corral-budget"})
            for task_id, step in steps.items():
                await wait_until(lambda: settled(client, task_id, step.usage.total), timeout=30)
            expired = await wait_until(lambda: settled(client, "never-ends", 0), timeout=30)
            shown = await client.budget(tenant, user)
    finally:
        budgets.stop()
    assert expired.status == "expired"
    day = next(w for w in shown.windows if w.scope == "user" and w.window == "day")
    assert day.used == sum(step.usage.total for step in steps.values())
    assert day.reserved == 0 and shown.open_tasks == 0


class Crash(Exception):
    """The process dies here (injected)."""


class CrashingKV:
    """The budget's real KV bucket, except that the process 'dies' right after its n-th write (or publish)
    succeeded: the write is stored, the handler never returns, and the message comes again."""

    def __init__(self, kv, crash_after: int | None) -> None:
        self.kv, self.crash_after, self.writes = kv, crash_after, 0

    def __getattr__(self, name: str):
        return getattr(self.kv, name)

    async def update(self, *args, **kwargs):
        return self.wrote(await self.kv.update(*args, **kwargs))

    async def create(self, *args, **kwargs):
        return self.wrote(await self.kv.create(*args, **kwargs))

    def wrote(self, result=None):
        self.writes += 1
        if self.writes == self.crash_after:
            raise Crash(f"after write {self.writes}")
        return result


async def test_a_crash_after_any_ledger_write_is_repaired_by_redelivery_without_billing_twice(settings, tenant):
    step_usage = Usage(input_tokens=40, output_tokens=160)
    async with Bus.connect(settings, "test-budget") as bus:
        kv = await bus.bucket(subjects.KV_BUDGET)

        async def run_task(task_id: str, user: str, crash_after: int | None) -> tuple[Budget, CrashingKV]:
            crashing = CrashingKV(kv, crash_after)

            async def emit(subject, event):
                await bus.emit(subject, event)
                crashing.wrote()

            budget = Budget(lambda: DEFAULT_POLICY, TypedBucket(crashing, Account, Account),
                            TypedBucket(crashing, TaskJournal, lambda: None), emit, utcnow)
            step = completed_step(task_id, tenant, user, 1, step_usage.input_tokens, step_usage.output_tokens)
            for handle, event in [(budget.on_validated, validated(task_id, tenant, user, 500)),
                                  (budget.on_step_completed, step), (budget.on_step_completed, step),
                                  (budget.on_task_finished, finished(task_id, tenant, user, step_usage)),
                                  (budget.on_step_completed, step)]:  # redelivered after the task ended
                try:
                    await handle(event)
                except Crash:
                    await handle(event)  # the redelivery
            return budget, crashing

        _, clean = await run_task("clean", "u-clean", None)
        assert clean.writes >= 10  # reserve x2, decide, publish, post x2, journal, close x2, finish, settle x2…
        for crash_after in range(1, clean.writes + 1):
            task_id, user = f"t-{crash_after}", f"u-{crash_after}-{uuid.uuid4().hex[:6]}"
            budget, _ = await run_task(task_id, user, crash_after)
            cost, shown = await budget.cost(tenant, task_id), await budget.show(tenant, user)
            account = await budget.accounts.get(user_key(tenant, user))
            assert (cost.status, cost.tokens, len(cost.steps)) == ("finished", 200, 1), crash_after
            assert [(w.used, w.reserved) for w in shown.windows if w.scope == "user"] == [(200, 0), (200, 0)]
            assert account.holds == {}, crash_after  # nothing left behind


async def test_a_step_another_replica_posts_while_a_release_reads_a_stale_account_is_journaled_by_the_release(
        settings, tenant):
    user = f"u-{uuid.uuid4().hex[:6]}"
    async with Bus.connect(settings, "test-budget") as bus:
        kv = await bus.bucket(subjects.KV_BUDGET)

        def replica() -> Budget:  # each with its own memory of what it wrote last
            return Budget(lambda: DEFAULT_POLICY, TypedBucket(kv, Account, Account),
                          TypedBucket(kv, TaskJournal, lambda: None), bus.emit, utcnow)

        first, second = replica(), replica()
        await first.on_validated(validated("r1", tenant, user, 500))
        await second.on_step_completed(completed_step("r1", tenant, user, 1, 40, 160))
        # `first` last wrote the account before the step: its release starts from that view
        ended = TaskFailed(task_id="r1", tenant=tenant, user=user, reason="permanent_error", error="a later step",
                           attempts=[])
        await first.on_task_finished(ended)
        cost, shown = await first.cost(tenant, "r1"), await first.show(tenant, user)
        account = await first.accounts.get(user_key(tenant, user))
    assert (cost.status, cost.tokens, [s.step_id for s in cost.steps]) == ("finished", 200, ["r1-a1"])
    assert [(w.used, w.reserved) for w in shown.windows] == [(200, 0)] * 4  # user and tenant, day and hour
    assert account.holds == {}
