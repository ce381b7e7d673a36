"""Distributed tasks, the agent pools' side: every worker replica claims its kind's subtasks on the task's board,
runs and answers them, renews its claim while it works, and the synthesis's holder ends the task; a claim whose
holder died lapses to another member, and a board nothing happens on fails its task, saying what was done.

The boards are written here as the executor writes them on admission of a distributed task (every entry waiting,
the synthesis's agent the plan's or the task's, `updated_at` now, `deadline_at` from the agent's deadline)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Union

import anyio
import msgspec
import pytest

from contracts import (
    StepCompleted,
    StepFailed,
    StepRequested,
    TaskAdmitted,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TaskSpec,
    TokenEstimate,
    Usage,
    subjects,
)
from contracts.boards import SYNTHESIS_ID, Board, Entry, ended_board_ttl
from contracts.events import Plan, Subtask
from contracts.policy import DEFAULT_POLICY, OrchestrationLimits
from services import auth
from services.client import Client
from services.workers.board import (
    Answer,
    Failure,
    Pool,
    answered,
    claimed,
    committed,
    holds,
    open_to,
    renewed,
    stopped,
    subtask_prompt,
    synthesis_prompt,
)
from shared.bus import Bus
from shared.kv import TypedBucket
from shared.watch import Watch
from tests.conftest import apply, running, services, stack, wait_until
from tests.signals import example_policy

pytestmark = [pytest.mark.anyio]
TENANT = "default"
FACTS = Subtask(id="facts", agent="research", instruction="Gather the facts.")
CODE = Subtask(id="code", agent="coding", instruction="Write the migration script.", needs=["facts"])
NOTES = Subtask(id="notes", agent="writing", instruction="Draft the release notes.")


def board_of(subtasks: list[Subtask], *, user: str = "u-boards", synthesis: str = "writing",
             on_failure: str = "fail_fast", mode: str = "distributed", now: float | None = None,
             deadline_s: float = 60.0) -> Board:
    """A new board, as the executor writes it. The synthesis entry's spec has the id `synthesis`: SYNTHESIS_ID
    (`=synthesis`) is outside SubtaskId's pattern, so a board holding it does not decode (see the report); the
    pools know the synthesis by its place on the board."""
    now = time.time() if now is None else now
    spec = TaskSpec(agent="writing", prompt="Ship the migration.", orchestration=mode)
    task = TaskAdmitted(task_id=f"t-{uuid.uuid4().hex[:10]}", tenant=TENANT, user=user, spec=spec,
                        estimate=TokenEstimate(prompt_tokens=2_000, max_output_tokens=8_000), reserved_tokens=10_000,
                        window="2026-12-01")
    return Board(task=task, mode=mode, on_failure=on_failure, entries=[Entry(spec=sub) for sub in subtasks],
                 synthesis=Entry(spec=Subtask(id="synthesis", agent=synthesis, instruction="Put them together.")),
                 created_at=now, updated_at=now, deadline_at=now + deadline_s)


def with_status(board: Board, entry_id: str, status: str, **fields) -> Board:
    entries = [msgspec.structs.replace(e, status=status, **fields) if e.spec.id == entry_id else e
               for e in board.entries]
    return msgspec.structs.replace(board, entries=entries)


def ids(found: list[tuple[str, Entry]]) -> list[str]:
    return [entry_id for entry_id, _ in found]


def completed_step(step: StepRequested, output: str) -> StepCompleted:
    return StepCompleted(task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id,
                         attempt=step.attempt, agent=step.agent, dependency=f"{step.provider}/{step.model}",
                         model=step.model, output=output, usage=Usage(input_tokens=10, output_tokens=5),
                         latency_ms=1.0)


def answer(board: Board, entry_id: str, output: str) -> Answer:
    step = StepRequested(task_id=board.task.task_id, tenant=TENANT, user=board.task.user, step_id=f"x/{entry_id}",
                         attempt=1, agent="research", provider="simulated", model="sim-small", prompt="p",
                         max_tokens=10)
    return Answer(step=completed_step(step, output), strategy=1, tier="fast", steps=1)


# --- the rules (no server) -------------------------------------------------------------------------------------


def test_a_subtask_is_open_to_its_kinds_pool_once_its_needs_completed_and_under_best_effort_once_they_ended():
    board = board_of([FACTS, CODE], now=100.0)
    assert ids(open_to(board, "research", 100.0, 4)) == ["facts"]
    assert open_to(board, "coding", 100.0, 4) == [] and open_to(board, "writing", 100.0, 4) == []
    for need, fail_fast, best_effort in (("claimed", [], []), ("completed", ["code"], ["code"]),
                                         ("failed", [], ["code"])):
        after = with_status(board, "facts", need, claim_expires=200.0)
        assert ids(open_to(after, "coding", 100.0, 4)) == fail_fast, need
        lenient = msgspec.structs.replace(after, on_failure="best_effort")
        assert ids(open_to(lenient, "coding", 100.0, 4)) == best_effort, need
    assert open_to(msgspec.structs.replace(board, ended="failed"), "research", 100.0, 4) == []


def test_a_claim_is_taken_over_only_once_it_has_lapsed_and_a_board_holds_no_more_live_claims_than_max_parallel():
    board = claimed(board_of([FACTS, NOTES], now=100.0), "facts", "member-a", now=100.0, lease_s=10.0)
    facts = board.entries[0]
    assert (facts.status, facts.claimed_by, facts.claim_expires, facts.claims) == ("claimed", "member-a", 110.0, 1)
    assert board.updated_at == 100.0
    assert open_to(board, "research", 109.9, 4) == []
    assert ids(open_to(board, "research", 110.0, 4)) == ["facts"]  # lapsed: the next member takes it over
    over = claimed(board, "facts", "member-b", now=110.0, lease_s=10.0)
    assert over.entries[0].claims == 2 and holds(over, "facts", "member-b", 2)
    assert not holds(over, "facts", "member-a", 1)  # the late holder may neither renew nor post
    assert renewed(over, "facts", "member-a", 1, now=111.0, lease_s=10.0) is None
    assert renewed(over, "facts", "member-b", 2, now=111.0, lease_s=10.0).entries[0].claim_expires == 121.0
    assert open_to(over, "writing", 111.0, max_parallel=1) == []  # facts holds the board's one live claim
    assert ids(open_to(over, "writing", 111.0, max_parallel=2)) == ["notes"]


def test_the_synthesis_is_open_once_every_subtask_ended_and_one_completed_and_never_on_a_hybrid_board():
    board = board_of([FACTS, NOTES], synthesis="writing", on_failure="best_effort", now=100.0)
    assert ids(open_to(board, "writing", 100.0, 4)) == ["notes"]
    one_left = with_status(board, "facts", "completed")
    assert ids(open_to(one_left, "writing", 100.0, 4)) == ["notes"]
    done = with_status(one_left, "notes", "failed", error="permanent: no")
    assert ids(open_to(done, "writing", 100.0, 4)) == [SYNTHESIS_ID]
    assert open_to(with_status(done, "facts", "failed"), "writing", 100.0, 4) == []  # nothing to put together
    assert open_to(msgspec.structs.replace(done, mode="hybrid"), "writing", 100.0, 4) == []  # the executor's


def test_a_failure_under_fail_fast_ends_the_task_naming_the_subtask_and_under_best_effort_only_when_all_failed():
    board = claimed(board_of([FACTS, NOTES], now=100.0), "facts", "m", now=100.0, lease_s=10.0)
    broke = Failure(reason="permanent_error", error="permanent: the model refused")
    after, end = answered(board, "facts", broke, now=101.0)
    assert after.ended == "failed" and after.entries[0].status == "failed"
    assert isinstance(end, TaskFailed) and end.reason == "permanent_error"
    assert end.error == "subtask facts failed: permanent: the model refused"
    lenient = msgspec.structs.replace(board, on_failure="best_effort")
    after, end = answered(lenient, "facts", broke, now=101.0)
    assert end is None and after.ended == "" and after.entries[0].error == "permanent: the model refused"
    after, end = answered(with_status(after, "notes", "claimed"), "notes", broke, now=102.0)
    assert after.ended == "failed" and end.error.startswith("no subtask of the plan succeeded: facts: permanent")
    after, end = answered(with_status(lenient, "facts", "completed"), "notes", broke, now=102.0)
    assert end is None and after.ended == ""  # the synthesis will say what is missing


def test_the_synthesis_answer_ends_the_task_in_the_same_write_with_every_entrys_usage():
    board = with_status(board_of([FACTS, NOTES], now=100.0), "facts", "completed", usage=Usage(
        input_tokens=100, output_tokens=20), claims=2, steps=2)
    board = with_status(board, "notes", "failed", error="timeout", claims=1, steps=1)
    board = claimed(board, SYNTHESIS_ID, "m", now=100.0, lease_s=10.0)
    after, end = answered(board, SYNTHESIS_ID, answer(board, SYNTHESIS_ID, "the answer"), now=101.0)
    assert after.ended == "completed" and after.synthesis.status == "completed"
    assert isinstance(end, TaskCompleted) and end.output == "the answer"
    assert (end.usage.input_tokens, end.usage.output_tokens) == (110, 25)
    assert (end.attempts, end.strategy, end.tier, end.dependency) == (4, 1, "fast", "simulated/sim-small")


def test_what_failed_steps_used_is_in_their_entrys_usage_in_what_the_parts_committed_and_in_the_tasks_end():
    spent = Usage(input_tokens=30, output_tokens=7)
    board = claimed(board_of([FACTS, NOTES], on_failure="best_effort", now=100.0), "notes", "m", 100.0, 10.0)
    board, _ = answered(board, "notes", Failure(reason="attempts_exhausted", error="transient: down", spent=spent),
                        now=101.0)
    assert board.entries[1].usage == spent  # a failed part's steps were billed: the board says so
    board = claimed(board, "facts", "m", 101.0, 10.0)
    after_retry = msgspec.structs.replace(answer(board, "facts", "the facts"), spent=spent)
    board, _ = answered(board, "facts", after_retry, now=102.0)
    assert board.entries[0].usage == Usage(input_tokens=40, output_tokens=12)  # the failed try and the answer
    assert committed(board) == 37 + 52
    board = claimed(board, SYNTHESIS_ID, "m", 102.0, 10.0)
    _, end = answered(board, SYNTHESIS_ID, answer(board, SYNTHESIS_ID, "the answer"), now=103.0)
    assert (end.usage.input_tokens, end.usage.output_tokens) == (30 + 40 + 10, 7 + 12 + 5)


def test_a_centralized_plans_committed_tokens_count_what_its_failed_steps_used():
    from contracts.events import Attempt
    from services.executor import plans
    from services.executor.state import SubtaskState, TaskRecord

    board = board_of([FACTS])
    failed = Attempt(step_id="s1", dependency="simulated/sim-small", error="transient", message="down",
                     usage=Usage(input_tokens=50, output_tokens=10))
    running = SubtaskState(spec=FACTS, status="running", estimate=100, attempts=[failed])
    record = TaskRecord(task=board.task, subtasks=[running], attempts=[failed],
                        planning_usage=Usage(input_tokens=5, output_tokens=5))
    assert plans.committed(record) == 10 + 60 + 60 + 100


def test_a_board_that_stalled_or_passed_its_deadline_ends_saying_what_was_done():
    board = with_status(board_of([FACTS, NOTES, CODE], now=100.0, deadline_s=60.0), "facts", "completed")
    board = with_status(board, "notes", "claimed", claimed_by="m-1", claim_expires=105.0)
    assert stopped(board, now=104.0, stall_s=5.0) is None
    after, failed = stopped(board, now=105.5, stall_s=5.0)
    assert after.ended == "failed" and failed.reason == "deadline_exceeded"
    assert failed.error == ("the board stalled: nothing changed for 5 s; done: facts; not done: notes (writing, "
                            "claimed by m-1), code (coding, waiting), the synthesis (writing, waiting)")
    _, late = stopped(msgspec.structs.replace(board, updated_at=159.0), now=160.0, stall_s=5.0)
    assert late.error.startswith("the task's deadline passed (60 s after its board was made); done: facts")
    assert stopped(msgspec.structs.replace(board, mode="hybrid"), now=200.0, stall_s=5.0) is None  # executor's
    assert stopped(after, now=200.0, stall_s=5.0) is None  # ended already: once


def test_a_subtasks_prompt_holds_the_request_and_what_it_needs_and_the_synthesis_every_result():
    board = with_status(board_of([FACTS, CODE, NOTES]), "facts", "completed", output="Postgres 16.")
    board = with_status(board, "notes", "failed", error="timeout: slow")
    assert subtask_prompt(board, board.entries[1]) == (
        "Overall request: Ship the migration.\n\nYour part (code): Write the migration script.\n\n"
        "Result of facts (research):\nPostgres 16.")
    assert synthesis_prompt(board) == (
        "Request: Ship the migration.\n\nPut these results together into one answer.\n\n"
        "Result of facts (research):\nPostgres 16.\n\nResult of code (coding): missing, waiting\n\n"
        "Result of notes (writing): missing, failed: timeout: slow")


def test_the_worker_identity_may_write_boards_and_publish_the_ends_of_tasks():
    granted = auth.permissions(auth.WORKER).publish
    assert {subjects.kv_writes(subjects.KV_BOARDS), subjects.ALL_COMPLETED, subjects.ALL_FAILED} <= set(granted)
    # ... and the integration tests below run the workers signed in as that identity: the server would log a
    # permissions violation (tests/conftest.py fails the test) if any write or end were refused.


# --- on a real nats-server -------------------------------------------------------------------------------------

_heard = msgspec.json.Decoder(Union[TaskCompleted, TaskFailed, TaskProgress, StepCompleted, StepFailed]).decode


class Heard:
    """Every task end, progress and step outcome published while the block runs."""

    def __init__(self) -> None:
        self.events: list = []

    def of(self, kind: type, task_id: str) -> list:
        return [e for e in self.events if isinstance(e, kind) and e.task_id == task_id]

    def ends(self, task_id: str) -> list:
        return self.of(TaskCompleted, task_id) + self.of(TaskFailed, task_id)

    async def end(self, task_id: str, timeout: float = 30.0):
        async def ended():
            return (self.ends(task_id) or [None])[0]

        return await wait_until(ended, timeout=timeout)


@asynccontextmanager
async def hearing(client: Client) -> AsyncIterator[Heard]:
    heard = Heard()

    async def on_msg(msg) -> None:
        try:
            heard.events.append(_heard(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass

    subs = [await client.bus.nc.subscribe(subject, cb=on_msg) for subject in (
        subjects.ALL_COMPLETED, subjects.ALL_FAILED, subjects.ALL_PROGRESS, subjects.ALL_STEP_COMPLETED,
        subjects.ALL_STEP_FAILED)]
    try:
        yield heard
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def board_bucket(bus: Bus) -> TypedBucket[Board]:
    return TypedBucket(await bus.bucket(subjects.KV_BOARDS), Board, lambda: None, expires=ended_board_ttl)


async def members(client: Client, kinds: dict[str, int]) -> list[dict]:
    """Each pool member's stats (`$SRV.STATS`), once every one of `kinds` (agent kind: replicas) answered."""
    found = []
    for kind, replicas in kinds.items():
        for reply in await client.replica_stats(f"corral-worker-{kind}", expect=replicas):
            found.append({"agent": kind, **reply["endpoints"][0]["data"]["pool"]})
    return found


async def settled(client: Client, kinds: dict[str, int]) -> list[dict]:
    """The members' stats once none holds a claim and none sees a board still open: none can end a task now."""
    async def idle():
        found = await members(client, kinds)
        return found if all(m["holding"] == 0 and m["open_boards"] == 0 for m in found) else None

    return await wait_until(idle, timeout=20)


@pytest.mark.integration
async def test_a_distributed_tasks_subtasks_are_answered_by_their_pools_and_the_synthesis_holder_ends_it_once(
        settings, user):
    # The lease is shorter than the facts' model call: its holder keeps it by renewing, or the other research
    # member would take it over.
    slow_facts = msgspec.structs.replace(FACTS, instruction="Gather the facts. [sim:latency=2.5]")
    policy = example_policy(orchestration=OrchestrationLimits(claim_lease_s=1.2, stall_s=30.0))
    kinds = {"research": 2, "coding": 1, "writing": 1}
    async with stack(settings, "worker:research", "worker:research", "worker:coding", "worker:writing",
                     policy=policy) as client, hearing(client) as heard:
        boards = await board_bucket(client.bus)
        board = board_of([slow_facts, CODE, NOTES], synthesis="writing", user=user)
        key, task_id = board.task.task_ref, board.task.task_id
        await boards.create(key, board)
        end = await heard.end(task_id)
        stats = await settled(client, kinds)
        final = await boards.get(key)
    assert isinstance(end, TaskCompleted), end
    kind_of = {m["member"]: m["agent"] for m in stats}
    assert final.ended == "completed" and final.synthesis.status == "completed"
    for entry in (*final.entries, final.synthesis):
        assert entry.status == "completed" and entry.claims == 1, entry  # facts' claim was renewed, never lost
        assert kind_of[entry.claimed_by] == entry.spec.agent
        assert entry.step_id.endswith("-c1s0a1")
    steps = {c.step_id: c for c in heard.of(StepCompleted, task_id)}
    assert set(steps) == {entry.step_id for entry in (*final.entries, final.synthesis)}  # each step once
    assert end.output == final.synthesis.output == steps[final.synthesis.step_id].output
    assert end.usage.total == sum(c.usage.total for c in steps.values())
    started = {p.step_id: p.occurred_at for p in heard.of(TaskProgress, task_id) if p.stage == "step_started"}
    facts, code = final.entries[0], final.entries[1]
    assert started[code.step_id] >= steps[facts.step_id].occurred_at  # code ran once facts had answered
    assert started[final.synthesis.step_id] >= max(steps[e.step_id].occurred_at for e in final.entries)
    assert len(heard.ends(task_id)) == 1 and sum(m["tasks_completed"] for m in stats) == 1
    assert sum(m["renewals"] for m in stats) >= 1


class Model:
    """A stand-in for Worker.on_step: answers every step, and remembers each."""

    def __init__(self) -> None:
        self.steps: list[StepRequested] = []

    async def __call__(self, step: StepRequested) -> StepCompleted:
        self.steps.append(step)
        await anyio.sleep(0.05)
        return completed_step(step, f"answer of {step.subtask or 'the synthesis'}")


@pytest.mark.integration
async def test_two_members_of_one_kind_racing_for_one_entry_win_one_claim_and_the_subtask_runs_once(settings, user):
    async with Bus.connect(settings, "test-boards") as bus:
        boards, model, published = await board_bucket(bus), Model(), []

        async def emit(subject, event):
            published.append(event)

        def member(n: int) -> Pool:
            return Pool("research", f"member-{n}", boards, model, emit, policy=lambda: DEFAULT_POLICY)

        pools = [member(0), member(1)]
        race = board_of([FACTS], synthesis="research", user=user)
        await boards.create(race.task.task_ref, race)
        _, revision = await boards.read(race.task.task_ref)
        won = []

        async def claim(pool: Pool) -> None:  # both decide on the same revision: one compare-and-set wins
            won.append(await pool.claim_next(race.task.task_ref, race, revision))

        async with anyio.create_task_group() as tg:
            for racer in pools:
                tg.start_soon(claim, racer)
        claims = [c for c in won if c is not None]
        assert len(claims) == 1 and sum(p.stats.lost_claims for p in pools) == 1
        raced = await boards.get(race.task.task_ref)
        assert raced.entries[0].claims == 1 and raced.entries[0].claimed_by == claims[0].board.entries[0].claimed_by

        # Two members following the bucket and running what they claim.
        stop, pools = anyio.Event(), [member(2), member(3)]
        board = board_of([FACTS], synthesis="research", user=user)
        async with anyio.create_task_group() as tg:
            for racer in pools:
                watch = Watch(boards.kv, racer.apply)
                tg.start_soon(watch.run, stop)
                await watch.live.wait()
                tg.start_soon(racer.run, stop)
            await boards.create(board.task.task_ref, board)
            final = await wait_until(lambda: ended(boards, board.task.task_ref))
            await wait_until(lambda: idle(pools))
            stop.set()
    facts_steps = [s for s in model.steps if s.task_id == board.task.task_id and s.subtask == "facts"]
    assert len(facts_steps) == 1 and final.entries[0].claims == 1
    assert [s.subtask for s in model.steps if s.task_id == board.task.task_id] == ["facts", ""]
    (end,) = [e for e in published if isinstance(e, (TaskCompleted, TaskFailed))]
    assert isinstance(end, TaskCompleted) and end.output == "answer of the synthesis" == final.synthesis.output


@pytest.mark.integration
async def test_a_late_holders_result_is_refused_and_the_board_keeps_the_result_of_the_member_that_took_over(
        settings, user):
    limits = OrchestrationLimits(claim_lease_s=60.0, stall_s=600.0)
    policy = msgspec.structs.replace(DEFAULT_POLICY, orchestration=limits)
    released, model, published = anyio.Event(), Model(), []

    async def late_model(step: StepRequested) -> StepCompleted:
        await released.wait()  # until the other member has taken the claim over and ended the task
        return await model(step)

    async def emit(subject, event):
        published.append(event)

    async with Bus.connect(settings, "test-boards") as bus:
        boards = await board_bucket(bus)
        late = Pool("research", "late", boards, late_model, emit, policy=lambda: policy)
        # the other member's clock is past the late holder's lease: to it, that claim has lapsed
        taker = Pool("research", "taker", boards, model, emit, policy=lambda: policy, clock=lambda: time.time() + 61)
        board = board_of([FACTS], synthesis="research", user=user, deadline_s=600.0)
        key, stop = board.task.task_ref, anyio.Event()
        async with anyio.create_task_group() as tg:
            for member in (late, taker):
                tg.start_soon(Watch(boards.kv, member.apply).run, stop)
            tg.start_soon(late.run, stop)
            await boards.create(key, board)
            await wait_until(lambda: held_by(boards, key, "late"))
            tg.start_soon(taker.run, stop)
            final, revision = await wait_until(lambda: ended_at(boards, key))
            released.set()
            await wait_until(lambda: idle([late, taker]))
            stop.set()
        after = await boards.read(key)
    assert final.entries[0].claimed_by == "taker" and final.entries[0].claims == 2
    assert final.entries[0].step_id == f"{TENANT}/{board.task.task_id}-facts-c2s0a1"
    assert after == (final, revision)  # the late holder's result was refused
    assert late.stats.abandoned == 1 and late.stats.completed == 0 and taker.stats.takeovers == 1
    assert [type(e) for e in published if isinstance(e, (TaskCompleted, TaskFailed))] == [TaskCompleted]


@pytest.mark.integration
async def test_a_member_that_stops_lets_its_claims_lapse_at_once_for_another_to_take_over(settings, user):
    async def never(step: StepRequested) -> StepCompleted:
        await anyio.sleep_forever()

    async def emit(subject, event):
        pass

    async with Bus.connect(settings, "test-boards") as bus:
        boards = await board_bucket(bus)
        leaving = Pool("research", "leaving", boards, never, emit, policy=lambda: DEFAULT_POLICY)  # a 10 s lease
        board = board_of([FACTS], synthesis="research", user=user)
        key, stop = board.task.task_ref, anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(Watch(boards.kv, leaving.apply).run, stop)
            tg.start_soon(leaving.run, stop)
            await boards.create(key, board)
            await wait_until(lambda: held_by(boards, key, "leaving"))
            stop.set()
        left = await boards.get(key)
    assert leaving.stats.holding == 0
    assert left.entries[0].claimed_by == "leaving" and left.entries[0].claim_expires <= time.time()
    assert ids(open_to(left, "research", time.time(), 4)) == ["facts"]


async def held_by(boards: TypedBucket[Board], key: str, member: str) -> bool:
    board = await boards.get(key)
    return board is not None and board.entries[0].claimed_by == member


async def ended_at(boards: TypedBucket[Board], key: str) -> tuple[Board, int] | None:
    board, revision = await boards.read(key)
    return (board, revision) if board is not None and board.ended else None


async def ended(boards: TypedBucket[Board], key: str) -> Board | None:
    board = await boards.get(key)
    return board if board is not None and board.ended else None


async def idle(pools: list[Pool]) -> bool:
    return all(pool.stats.holding == 0 for pool in pools)


@pytest.mark.integration
@pytest.mark.fault
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
async def test_a_pool_member_that_dies_or_freezes_holding_a_claim_loses_it_to_another_which_finishes_the_task_once(
        settings, user, tmp_path, how):
    """SIGKILL: the holder dies mid-step. SIGSTOP: it freezes, and once the other member has finished the task it
    wakes up, finds its claim taken over and posts nothing."""
    await apply(settings, example_policy(orchestration=OrchestrationLimits(claim_lease_s=1.0, stall_s=30.0)))
    workers = services(settings, tmp_path / "logs")
    frozen = None
    try:
        first = workers.start_one("worker", agent="research")
        async with Client.connect(settings, "test") as client, hearing(client) as heard:
            await client.wait_ready({"corral-worker-research"})
            boards = await board_bucket(client.bus)
            slow = Subtask(id="slow", agent="research", instruction="Gather the facts. [sim:latency=4]")
            board = board_of([slow], synthesis="research", user=user)
            key, task_id = board.task.task_ref, board.task.task_id

            async def held_by_first():
                now = await boards.get(key)
                return now.entries[0].claimed_by if f"-{first.pid}-" in now.entries[0].claimed_by else None

            await boards.create(key, board)
            late_holder = await wait_until(held_by_first, timeout=20)
            if how == "SIGKILL":
                first.kill()
            else:
                os.kill(first.pid, signal.SIGSTOP)
                frozen = first.pid
            async with running(settings, "worker:research"):
                end = await heard.end(task_id)
                final, revision = await boards.read(key)
                if frozen:
                    os.kill(frozen, signal.SIGCONT)
                    frozen = None

                    async def gave_up():
                        found = await members(client, {"research": 2})
                        return [m for m in found if m["member"] == late_holder and m["abandoned"] == 1]

                    await wait_until(gave_up, timeout=20)
                stats = await settled(client, {"research": 2 if how == "SIGSTOP" else 1})
                after, revision_after = await boards.read(key)
    finally:
        if frozen:
            os.kill(frozen, signal.SIGCONT)
        workers.stop()
    assert isinstance(end, TaskCompleted), end
    entry = final.entries[0]
    assert entry.status == "completed" and entry.claims == 2 and entry.claimed_by != late_holder
    assert entry.step_id == f"{TENANT}/{task_id}-slow-c2s0a1"
    assert (after, revision_after) == (final, revision)  # the late holder never posted
    late = [s for s in heard.of(StepCompleted, task_id) + heard.of(StepFailed, task_id) if "-slow-c1" in s.step_id]
    if how == "SIGKILL":
        assert late == []  # it died mid-call
    else:
        assert len(late) == 1  # the call under way ended (its usage is billed), and no other was started
    assert len(heard.ends(task_id)) == 1 and sum(m["tasks_completed"] for m in stats) == 1


@pytest.mark.integration
async def test_a_board_nothing_changes_on_for_the_stall_time_fails_its_task_once_saying_what_was_done(settings, user):
    painting = Subtask(id="paint", agent="painter", instruction="Paint the release banner.")  # no pool runs it
    policy = example_policy(orchestration=OrchestrationLimits(stall_s=1.0))
    kinds = {"research": 1, "writing": 1}
    async with stack(settings, "worker:research", "worker:writing", policy=policy) as client, \
            hearing(client) as heard:
        boards = await board_bucket(client.bus)
        board = board_of([FACTS, painting], synthesis="writing", user=user)
        await boards.create(board.task.task_ref, board)
        end = await heard.end(board.task.task_id)
        stats = await settled(client, kinds)
        final = await boards.get(board.task.task_ref)
    assert isinstance(end, TaskFailed) and end.reason == "deadline_exceeded", end
    assert end.error == ("the board stalled: nothing changed for 1 s; done: facts; not done: paint (painter, "
                         "waiting), the synthesis (writing, waiting)")
    assert final.ended == "failed" and [e.status for e in final.entries] == ["completed", "waiting"]
    assert len(heard.ends(board.task.task_id)) == 1 and sum(m["tasks_failed"] for m in stats) == 1


@pytest.mark.integration
async def test_a_pool_member_that_dies_after_ending_a_board_and_before_publishing_loses_no_end(
        settings, tenant, user):
    # No worker runs: the test writes the board's end as a member would, and publishes nothing, as if it died.
    spec = TaskSpec(agent="writing", prompt="Ship it.", orchestration="distributed", plan=Plan(subtasks=[FACTS]))
    async with stack(settings, "guard", "budget", "executor", policy=example_policy()) as client, \
            hearing(client) as heard:
        task_id = await client.submit(spec, tenant=tenant, user=user)
        boards = await board_bucket(client.bus)
        key = f"{tenant}.{task_id}"
        board = await wait_until(lambda: boards.get(key))
        board = with_status(board, "facts", "completed", usage=Usage(input_tokens=10, output_tokens=5), claims=1)
        board = claimed(board, SYNTHESIS_ID, "m-dead", now=time.time(), lease_s=10.0)
        ended, end = answered(board, SYNTHESIS_ID, answer(board, SYNTHESIS_ID, "the answer"), now=time.time())
        assert await boards.write_if(key, ended, (await boards.read(key))[1])
        heard_end = await heard.end(task_id)
        status = await client.task_status(task_id, tenant=tenant)
    assert isinstance(heard_end, TaskCompleted) and heard_end.output == "the answer" == end.output
    assert len(heard.of(TaskCompleted, task_id)) == 1
    assert status.status == "completed"
