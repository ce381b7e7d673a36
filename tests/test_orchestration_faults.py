"""Orchestrated tasks survive their coordinator: an executor SIGKILLed while subtasks run, or between the last
subtask and the synthesis, a StepCompleted delivered twice, and two executor replicas deciding for one plan at
once; every subtask and the synthesis still run once, the task ends once, and each step is billed once.

What counts is what the streams store (what every durable consumer receives, after the streams' de-duplication)
and what the budget billed; a republished decision heard on core NATS must be the very same event."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Union

import anyio
import msgspec
import pytest

from contracts import StepCompleted, StepFailed, StepRequested, TaskCompleted, TaskFailed, TaskSpec, subjects
from contracts.events import Plan, Subtask
from contracts.policy import OrchestrationLimits, Policy
from services.client import Client
from services.executor.state import SYNTHESIS, step_id
from shared.config import Settings
from tests.conftest import apply, running, services, stack, wait_until
from tests.signals import example_policy
from tests.test_budget import settled

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.fault]
WORKERS = ("worker:research", "worker:coding", "worker:writing")
EXECUTOR_ENV = {"CORRAL_ACK_WAIT_S": "2"}  # a killed replica's unacknowledged messages come again after 2 s
_event = msgspec.json.Decoder(Union[StepRequested, StepCompleted, StepFailed, TaskCompleted, TaskFailed]).decode


def planned(subtasks: list[Subtask]) -> TaskSpec:
    return TaskSpec(agent="writing", prompt="Ship the migration.", orchestration="centralized",
                    plan=Plan(subtasks=subtasks))


def part(name: str, agent: str, latency_s: float, needs: tuple[str, ...] = ()) -> Subtask:
    return Subtask(id=name, agent=agent, instruction=f"Do {name}. [sim:latency={latency_s}]", needs=list(needs))


class Heard:
    """Every step event and task end published (core NATS: repeats the streams drop are heard too), and an
    action run the moment a chosen one is heard."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.trigger: tuple[Callable[[object], bool], Callable[[object], None]] | None = None

    def when(self, heard: Callable[[object], bool], act: Callable[[object], None]) -> None:
        """Run `act(event)` once, as soon as an event for which `heard(event)` is true comes."""
        self.trigger = (heard, act)

    def of(self, kind: type, task_id: str) -> list:
        return [e for e in self.events if isinstance(e, kind) and e.task_id == task_id]


@asynccontextmanager
async def hearing(client: Client) -> AsyncIterator[Heard]:
    heard = Heard()

    async def on_msg(msg) -> None:
        try:
            event = _event(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # progress and the rest: not counted here
        heard.events.append(event)
        if heard.trigger is not None and heard.trigger[0](event):
            _, act = heard.trigger
            heard.trigger = None
            act(event)

    subs = [await client.bus.nc.subscribe(subject, cb=on_msg, pending_msgs_limit=1_000_000)
            for subject in (subjects.ALL_STEP_EVENTS, subjects.ALL_COMPLETED, subjects.ALL_FAILED)]
    try:
        yield heard
    finally:
        for sub in subs:
            await sub.unsubscribe()


class Stored(msgspec.Struct):
    """One task's step events and ends as the streams hold them."""

    requested: list[StepRequested]
    completed: list[StepCompleted]
    failed: list[StepFailed]
    ends: list[TaskCompleted | TaskFailed]


async def _stored_on(client: Client, stream: str, subject: str) -> list[object]:
    info = await client.bus.js.stream_info(stream, subjects_filter=subject)
    count = sum((info.state.subjects or {}).values())
    if not count:
        return []
    sub = await client.bus.js.pull_subscribe(subject, stream=stream)  # ephemeral, from the stream's start
    msgs = []
    try:
        while len(msgs) < count:
            msgs += await sub.fetch(count - len(msgs), timeout=5)
    finally:
        await sub.unsubscribe()
    return [_event(m.data) for m in msgs]


async def stored(client: Client, task_id: str) -> Stored:
    steps = [e for subject in (subjects.ALL_STEP_REQUESTED, subjects.ALL_STEP_COMPLETED, subjects.ALL_STEP_FAILED)
             for e in await _stored_on(client, subjects.STREAM_STEPS, subject) if e.task_id == task_id]
    ends = [e for subject in (subjects.ALL_COMPLETED, subjects.ALL_FAILED)
            for e in await _stored_on(client, subjects.STREAM_TASKS, subject) if e.task_id == task_id]
    return Stored(requested=[e for e in steps if isinstance(e, StepRequested)],
                  completed=[e for e in steps if isinstance(e, StepCompleted)],
                  failed=[e for e in steps if isinstance(e, StepFailed)], ends=ends)


CONSUMERS = (subjects.CONSUMER_EXECUTOR_TASKS, subjects.CONSUMER_EXECUTOR_STEPS,
             *(subjects.consumer_worker(agent) for agent in ("research", "coding", "writing")))
STREAM_OF = {subjects.CONSUMER_EXECUTOR_TASKS: subjects.STREAM_TASKS}


async def drained(client: Client) -> bool:
    """The executor's and the workers' consumers have nothing left to deliver and no delivery unacknowledged
    (a killed replica's comes again after the ack wait): every decision there was to make has been made."""
    for name in CONSUMERS:
        info = await client.bus.js.consumer_info(STREAM_OF.get(name, subjects.STREAM_STEPS), name)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def ended(heard: Heard, task_id: str, timeout: float = 30.0) -> TaskCompleted | TaskFailed:
    async def end():
        found = heard.of(TaskCompleted, task_id) + heard.of(TaskFailed, task_id)
        return found[0] if found else None

    return await wait_until(end, timeout=timeout)


async def assert_ran_once(client: Client, heard: Heard, tenant: str, task_id: str, subtasks: list[Subtask],
                          copied: Sequence[str] = ()) -> Stored:
    """Each subtask and the synthesis were asked for once (no second attempt of any: none ran twice) and
    completed once (besides the `copied` answers the test published again), nothing failed, the task ended once
    with every step's usage once, and the budget billed each step once. Call once the consumers have drained."""
    facts = await stored(client, task_id)
    synthesis = step_id(tenant, task_id, 0, 1, SYNTHESIS)
    expected = sorted([step_id(tenant, task_id, 0, 1, sub.id) for sub in subtasks] + [synthesis])
    assert sorted(r.step_id for r in facts.requested) == expected
    assert sorted(c.step_id for c in facts.completed) == sorted([*expected, *copied])
    facts.completed = list({c.step_id: c for c in facts.completed}.values())
    assert not facts.failed, facts.failed
    (end,) = facts.ends
    assert isinstance(end, TaskCompleted), end
    assert end.usage.total == sum(c.usage.total for c in facts.completed)
    assert end.output == next(c.output for c in facts.completed if c.step_id == synthesis)
    # A repeat heard on core NATS (a redelivery's republish, dropped by the stream) is the very same end.
    heard_ends = heard.of(TaskCompleted, task_id) + heard.of(TaskFailed, task_id)
    assert {msgspec.json.encode(e) for e in heard_ends} == {msgspec.json.encode(end)}
    assert {r.step_id for r in heard.of(StepRequested, task_id)} == set(expected)
    cost = await wait_until(lambda: settled(client, task_id, end.usage.total, tenant), timeout=15)
    assert sorted(s.step_id for s in cost.steps) == expected
    return facts


def day_used(shown) -> int:
    return next(w for w in shown.windows if w.scope == "user" and w.window == "day").used


def executors(settings: Settings, tmp_path: Path):
    return services(settings, tmp_path / "logs", env=EXECUTOR_ENV)


async def _replicas(client: Client, name: str, count: int) -> bool:
    return (await client.running_services())[name] >= count


async def test_an_executor_killed_while_subtasks_run_leaves_each_subtask_run_once_and_the_task_ended_once(
        settings, tenant, user, tmp_path):
    await apply(settings, example_policy())
    parts = [part("facts", "research", 1.0), part("code", "coding", 1.3), part("sources", "research", 1.6)]
    processes = executors(settings, tmp_path)
    try:
        first = processes.start_one("executor")
        async with running(settings, "guard", "budget", *WORKERS), Client.connect(settings, "test") as client, \
                hearing(client) as heard:
            await client.wait_ready({"corral-guard", "corral-budget", "corral-executor", "corral-worker-research",
                                     "corral-worker-coding", "corral-worker-writing"})
            killed = anyio.Event()
            done_at_kill: set[str] = set()

            def kill(event) -> None:  # SIGKILL as the first part's answer comes in: the others are still running
                first.kill()
                done_at_kill.update(c.step_id for c in heard.of(StepCompleted, event.task_id))
                killed.set()

            heard.when(lambda e: isinstance(e, StepCompleted), kill)
            task_id = await client.submit(planned(parts), tenant=tenant, user=user)
            with anyio.fail_after(20):
                await killed.wait()
            processes.start_one("executor")  # its replacement, on the same durable consumers
            await ended(heard, task_id)
            await wait_until(lambda: drained(client), timeout=15)
            facts = await assert_ran_once(client, heard, tenant, task_id, parts)
            shown = await client.budget(tenant, user)
    finally:
        processes.stop()
    assert len(done_at_kill) == 1  # two subtasks were still running when their coordinator died
    assert day_used(shown) == sum(c.usage.total for c in facts.completed) and shown.open_tasks == 0


def patient_synthesis() -> Policy:
    """The example policy, its synthesis agent's (writing's) attempts given 30 s: a replacement executor that
    republishes a synthesis decided just before the kill does so within the attempt's time, however slowly it
    starts on a busy machine. (A step republished after its deadline is refused by the worker as a timeout and
    costs the step an attempt, which this test would count as a second run.)"""
    policy = example_policy()
    writing = policy.agents["writing"]
    chain = [msgspec.structs.replace(strategy, timeout_s=30.0) for strategy in writing.chain]
    patient = msgspec.structs.replace(writing, chain=chain)
    return msgspec.structs.replace(policy, agents={**policy.agents, "writing": patient})


async def test_an_executor_killed_as_the_last_subtask_answers_runs_the_synthesis_once_after_its_restart(
        settings, tenant, user, tmp_path):
    await apply(settings, patient_synthesis())
    parts = [part("facts", "research", 0.2), part("code", "coding", 0.8)]
    processes = executors(settings, tmp_path)
    try:
        first = processes.start_one("executor")
        # No worker for the synthesis's agent yet: whatever the dying executor got out, the synthesis cannot
        # have run before its restart.
        async with running(settings, "guard", "budget", "worker:research", "worker:coding"), \
                Client.connect(settings, "test") as client, hearing(client) as heard:
            await client.wait_ready({"corral-guard", "corral-budget", "corral-executor", "corral-worker-research",
                                     "corral-worker-coding"})
            killed = anyio.Event()
            task_id = "synth-gap"
            last = step_id(tenant, task_id, 0, 1, "code")
            heard.when(lambda e: isinstance(e, StepCompleted) and e.step_id == last,
                       lambda _: (first.kill(), killed.set()))
            await client.submit(planned(parts), tenant=tenant, user=user, task_id=task_id)
            with anyio.fail_after(20):
                await killed.wait()
            processes.start_one("executor")
            async with running(settings, "worker:writing"):
                await ended(heard, task_id)
                await wait_until(lambda: drained(client), timeout=15)
            facts = await assert_ran_once(client, heard, tenant, task_id, parts)
            shown = await client.budget(tenant, user)
    finally:
        processes.stop()
    (synthesis,) = [r for r in facts.requested if not r.subtask]
    outputs = {c.step_id: c.output for c in facts.completed}
    assert all(outputs[step_id(tenant, task_id, 0, 1, sub.id)] in synthesis.prompt for sub in parts)
    assert day_used(shown) == sum(c.usage.total for c in facts.completed) and shown.open_tasks == 0


async def test_a_subtasks_step_completed_delivered_again_never_starts_what_needs_it_twice_nor_ends_the_task_twice(
        settings, tenant, user):
    # `code` and `notes` need `facts`; the synthesis needs all three.
    parts = [part("facts", "research", 0.2), part("code", "coding", 0.3, needs=("facts",)),
             part("notes", "writing", 0.3, needs=("facts",))]
    task_id = "twice-told"
    facts_step = step_id(tenant, task_id, 0, 1, "facts")
    async with stack(settings, "guard", "budget", "executor", *WORKERS, policy=example_policy()) as client, \
            hearing(client) as heard:
        copies = []

        async def again(event: StepCompleted, n: int) -> None:
            """`n` more copies of `event`, each with an id of its own: the stream keeps them all."""
            for _ in range(n):
                copies.append(event.step_id)
                await client.bus.js.publish(subjects.step_completed(tenant), msgspec.json.encode(event), headers={
                    subjects.HEADER_MSG_ID: f"copy-{len(copies)}-{event.dedup_key()}"})

        async with anyio.create_task_group() as tg:
            # Three copies of `facts`' answer the moment it is heard: they race the original in the executor.
            heard.when(lambda e: isinstance(e, StepCompleted) and e.step_id == facts_step,
                       lambda e: tg.start_soon(again, e, 3))
            await client.submit(planned(parts), tenant=tenant, user=user, task_id=task_id)
            end = await ended(heard, task_id)
        # And again once the task has ended: every subtask's answer and the synthesis's.
        for answer in {c.step_id: c for c in heard.of(StepCompleted, task_id)}.values():
            await again(answer, 2)
        await wait_until(lambda: drained(client), timeout=15)
        facts = await assert_ran_once(client, heard, tenant, task_id, parts, copied=copies)
        shown = await client.budget(tenant, user)
    assert isinstance(end, TaskCompleted), end
    assert copies[:3] == [facts_step] * 3 and sorted(set(copies[3:])) == sorted(c.step_id for c in facts.completed)
    # `code` and `notes` were asked for once each, given facts' output.
    requested = {r.subtask: r for r in facts.requested}
    facts_answer = next(c for c in facts.completed if c.step_id == facts_step)
    for sub in ("code", "notes"):
        assert facts_answer.output in requested[sub].prompt
    assert day_used(shown) == end.usage.total and shown.open_tasks == 0


async def test_two_executor_replicas_deciding_at_once_request_each_subtask_once_and_end_each_task_once(
        settings, tenant, user, tmp_path):
    policy = msgspec.structs.replace(example_policy(), orchestration=OrchestrationLimits(max_parallel=8))
    await apply(settings, policy)
    # Eight independent parts answering at the same moment: their outcomes reach both replicas together.
    parts = [part(f"p{n}", ("research", "coding")[n % 2], 0.4) for n in range(8)]
    tasks = [f"wide-{n}" for n in range(4)]
    processes = executors(settings, tmp_path)
    try:
        processes.start_one("executor")
        processes.start_one("executor")
        async with running(settings, "guard", "budget", *WORKERS), Client.connect(settings, "test") as client, \
                hearing(client) as heard:
            await client.wait_ready({"corral-guard", "corral-budget", "corral-worker-research",
                                     "corral-worker-coding", "corral-worker-writing"})
            await wait_until(lambda: _replicas(client, "corral-executor", 2), timeout=30)
            async with anyio.create_task_group() as tg:
                for task_id in tasks:
                    tg.start_soon(lambda t: client.submit(planned(parts), tenant=tenant, user=user, task_id=t),
                                  task_id)
            for task_id in tasks:
                await ended(heard, task_id)
            await wait_until(lambda: drained(client), timeout=15)
            billed = 0
            for task_id in tasks:
                facts = await assert_ran_once(client, heard, tenant, task_id, parts)
                billed += sum(c.usage.total for c in facts.completed)
            handled = [reply["endpoints"][0]["data"]["consumers"][subjects.CONSUMER_EXECUTOR_STEPS]["handled"]
                       for reply in await client.replica_stats("corral-executor", expect=2)]
            shown = await client.budget(tenant, user)
    finally:
        processes.stop()
    assert len(handled) == 2 and all(handled), handled  # both replicas decided for the plans
    assert day_used(shown) == billed and shown.open_tasks == 0
