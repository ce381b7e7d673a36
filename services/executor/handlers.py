"""executor: run a task down its agent's fallback chain, one step at a time, until one answers.

For each strategy in order (e.g. advanced model -> fast model -> cached answer):

- a dependency whose circuit is open is not called: the strategy is skipped at once
  (recorded as an attempt with `called` false); in half-open the step runs only with
  a probe lease from the breaker;
- each attempt has a timeout (the worker stops there; a sweep covers a worker that never
  answers); the task's deadline bounds the whole chain;
- retryable failures (transient, timeout, rate_limited) are retried on the same strategy
  with exponential backoff and full jitter, never sooner than the dependency's retry-after,
  up to the strategy's max_attempts; a permanent error moves to the next strategy at once;
- when no strategy is left the task fails with every attempt and "All strategies failed.
  Last error: …"; its reason is the last attempt's (breaker_open when it was skipped), a
  cache miss aside.

Crash safety: each handler decides, records the decision in the task's record with
compare-and-set (naming the event that caused it), and only then publishes it. A
redelivered event finds its decision recorded and publishes the same step or terminal
event again, which the stream drops by its Nats-Msg-Id. So a decision that depends on
time or on breaker state, which may differ on redelivery, is made once: a redelivered
event never produces a second, different step. Two handlers deciding for one task at
once (a late outcome and the timeout sweep) cannot both win the compare-and-set.

A record that does not decode (quarantined: its bytes are a dead letter, shared/kv.py)
ends its task: the first handler to read it, for a step outcome or a redelivered
admission, fails the task with a reason that says so and writes that failure over
the bad value (compare-and-set on its revision). Its state being unknown, the task
is never started again, and it does not wait for ever unheard.

Reads are saved where it is safe: a handler first decides on the record as this
process last wrote it (and a new task on no record), and reads the bucket only when
that compare-and-set fails or the remembered record says the event is not current.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio

from contracts import (
    RETRYABLE,
    Attempt,
    StepCompleted,
    StepFailed,
    StepRequested,
    TaskAdmitted,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    Usage,
    subjects,
)
from contracts.approvals import ApprovalDecided
from contracts.events import FailReason, clip, task_ref
from contracts.policy import Policy, Strategy
from contracts.state import CACHE_DEPENDENCY, dependency_key, tool_key
from contracts.boards import SYNTHESIS_ID, Board
from contracts.commands import ExtendReservation
from services.executor import approvals, plans
from services.executor.boards import new_board
from services.executor.state import (
    PLANNING,
    SYNTHESIS,
    CachedAnswer,
    SubtaskState,
    TaskRecord,
    admitted_from,
    cache_key,
    step_id,
)
from shared import plans as shared_plans
from shared import tiering, tracing
from shared.breakers import BreakerGate
from shared.kv import Contention, TypedBucket
from shared.reservations import Reserve, part_estimate, shortfall
from shared.slots import Slots, holder

Emit = Callable[[str, Any], Awaitable[None]]
CurrentPolicy = Callable[[], Policy]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
DECIDE_ATTEMPTS = 16
"""Fresh reads one event may decide on before it is retried later: each lost compare-and-set is another
decision made for the task meanwhile (a plan's subtasks answer at once)."""
UNREADABLE = ("the executor's record of this task does not decode (it is kept as a dead letter): the task is "
              "stopped rather than run again")


SLOT_FREED = "=slots"
"""The cause a decision records when the sweep started subtasks that had waited for a tenant slot."""
_ANSWERED = object()
"""_schedule's word for: a cached answer ended the task."""


def _agent_of(record: TaskRecord, cursor: TaskRecord | SubtaskState) -> str:
    """The agent kind that runs `cursor`'s step: a subtask's, the synthesis's, or the task's own."""
    if isinstance(cursor, SubtaskState):
        return cursor.spec.agent
    plan = record.task.spec.plan
    return (plan.synthesis or record.task.spec.agent) if plan is not None and record.phase == "synthesis" \
        else record.task.spec.agent


class _Stale(Exception):
    """The task's record changed since it was read: this decision does not count."""


def dependency_of(strategy: Strategy) -> str:
    return CACHE_DEPENDENCY if strategy.kind == "cache" else dependency_key(strategy.provider, strategy.model)


class Executor:
    def __init__(self, policy: CurrentPolicy, tasks: TypedBucket[TaskRecord], gate: BreakerGate, emit: Emit, *,
                 cache: TypedBucket[CachedAnswer] | None = None, boards: TypedBucket[Board] | None = None,
                 reserve: Reserve | None = None, slots: Slots | None = None, clock: Clock = time.time,
                 sleep: Sleep = anyio.sleep, republish_window_s: float = 120.0,
                 classifier: tiering.Classifier | None = None) -> None:
        self.policy = policy
        self.tasks = tasks
        self.gate = gate
        self.emit = emit
        self.cache = cache
        self.boards = boards
        self.reserve = reserve
        """Asks the budget for more when a part of a plan would take its task past its reservation (None: never
        asks, e.g. in tests of the fallback chains alone)."""
        self.slots = slots
        """Each tenant's running subtasks, over every task (None: no per-tenant limit)."""
        self.classifier = classifier or tiering.Classifier()
        """Tiering's classifier on the prompt's embedding, for agents with `tiering.classify` on (its model
        loads on first use)."""
        self.clock = clock
        self.sleep = sleep
        self.republish_window_s = republish_window_s
        """The stream's duplicate window: a decision is published again only within it, where the stream
        drops the repeat if the first publish had landed."""

    # --- events in ----------------------------------------------------------------

    async def on_admitted(self, task: TaskAdmitted) -> None:
        await self._decide(self._admit, task)

    async def on_step(self, step: StepCompleted | StepFailed) -> None:
        if isinstance(step, StepCompleted):
            await self.on_step_completed(step)
        else:
            await self.on_step_failed(step)

    async def on_step_completed(self, step: StepCompleted) -> None:
        await self._decide(self._complete, step)

    async def on_step_failed(self, step: StepFailed) -> None:
        await self._decide(self._retry_or_fall_back, step)

    async def on_approval(self, decision: ApprovalDecided) -> None:
        await self._decide(partial(approvals.decided, self), decision)

    async def _decide(self, handler: Callable[[Any, bool], Awaitable[None]], event: Any) -> None:
        """Run `handler` on the record as this process last wrote it (no read), and again on a fresh
        read while that record proves stale. A decision counts only once its compare-and-set succeeds,
        so a stale record never decides. A conflict on a fresh read means another handler decided in
        between, but not that this event's decision was made: in a plan, that handler may have been
        another subtask's outcome, and this one still waits for its own. So it decides again on the
        newer record, where an event whose decision is already made finds nothing left to do; a record
        that stays that busy raises Contention, and the event comes again later."""
        try:
            await handler(event, False)
            return
        except _Stale:
            pass
        for attempt in range(DECIDE_ATTEMPTS):
            try:
                await handler(event, True)
                return
            except _Stale:
                await anyio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 6)))
        raise Contention(f"the record of task {event.task_ref} changed under {DECIDE_ATTEMPTS} decisions in a row",
                         retry_after_s=0.5)

    async def _admit(self, task: TaskAdmitted, fresh: bool) -> None:
        # A task is almost always new here: first try to create its record without reading.
        record, revision = await self.tasks.read(task.task_ref) if fresh else (None, 0)
        if record is not None:
            await self._republish(record, task.task_id)
            return
        if revision:  # a record is there and does not decode: the task may have run already
            await self._fail_unreadable(task, revision, task.task_id)
            return
        now = self.clock()
        agent = self.policy().agents.get(task.spec.agent)
        chain = tiering.route(agent, task.spec, await self.classifier.tier(agent, task.spec)) if agent else []
        record = TaskRecord(task=task, admitted_at=now, chain=chain, deadline_at=now + (agent.deadline_s if agent else 0.0))
        if agent is None:
            await self._fail(record, revision, task.task_id, "permanent_error",
                             f"agent kind {task.spec.agent!r} is not in the policy")
            return
        if task.spec.orchestration == "single":
            await self._advance(record, revision, task.task_id, strategy=0, attempt=1)
            return
        if task.spec.plan is None:  # the manager plans first: the record's own step
            record.phase = "planning"
            await self._advance(record, revision, task.task_id, strategy=0, attempt=1)
            return
        await self._start_plan(record, revision, task.task_id, task.spec.plan)

    async def _start_plan(self, record: TaskRecord, revision: int, cause: str, plan) -> None:
        agents = self.policy().agents
        unknown = sorted({sub.agent for sub in plan.subtasks} - set(agents))
        if unknown:
            await self._end_failed(record, revision, cause, "permanent_error",
                                   f"the plan's agent kinds {unknown} are not in the policy")
            return
        if record.task.spec.orchestration in ("distributed", "hybrid") and self.boards is not None:
            task = record.task
            await self.boards.create(task.task_ref, new_board(task, plan, self.clock(), record.deadline_at,
                                                              trace=tracing.inject({}),
                                                              planning_usage=record.planning_usage,
                                                              planning_steps=record.steps))
            record.phase, record.chain, record.plan = "board", [], plan  # the pools take it from here
            await self._record(record, revision, cause)
            return
        record.phase, record.chain = "subtasks", []
        record.subtasks = [SubtaskState(spec=sub, chain=list(agents[sub.agent].chain)) for sub in plan.subtasks]
        await self._plan_advanced(record, revision, cause)

    async def note_board_end(self, board: Board) -> None:
        """Distributed: the pools ended the task on its board; say so in this record (the board decided), having
        published the end the board holds: its writer did too, unless it died first (the stream keeps one)."""
        record, revision = await self.tasks.read(board.task.task_ref)
        if record is None or record.status != "running" or record.phase != "board":
            return
        if board.outcome is not None and self.clock() - board.updated_at <= self.republish_window_s:
            subject = subjects.task_completed if isinstance(board.outcome, TaskCompleted) else subjects.task_failed
            with tracing.within(board.trace):
                await self.emit(subject(board.task.tenant), board.outcome)
        record.status = "completed" if board.ended == "completed" else "failed"
        record.outcome = board.outcome
        record.usage = Usage.sum([board.planning_usage, *(e.usage for e in [*board.entries, board.synthesis])])
        try:
            await self._record(record, revision, "board")
        except _Stale:  # another replica noted it first
            pass

    async def synthesise_board(self, board: Board) -> None:
        """Hybrid: every subtask on the board has ended; run the synthesis over their results as this task's
        own step (the supervisor has claimed it on the board for this replica)."""
        record, revision = await self.tasks.read(board.task.task_ref)
        if record is None or record.status != "running" or record.phase != "board":
            return
        record.subtasks = [SubtaskState(spec=entry.spec, status="completed" if entry.status == "completed" else "failed",
                                        output=entry.output, usage=entry.usage, error=entry.error, steps=entry.steps)
                           for entry in board.entries]
        record.extensions = {entry.spec.id: entry.extended for entry in board.entries if entry.extended}
        agent = self.policy().agents.get(board.synthesis.spec.agent)
        record.phase, record.chain = "synthesis", list(agent.chain) if agent else []
        ended = await self._cover(record, SYNTHESIS_ID, self._estimate(record, record)) or \
            await self._schedule(record, revision, board.task.task_id, record, strategy=0, attempt=1)
        with tracing.within(board.trace):  # started by the board's watch: the task's trace is the board's
            if ended is not None:
                await self._fail(record, revision, board.task.task_id, *ended)
                return
            await self._record(record, revision, board.task.task_id)
            await self._publish_step(record)

    async def _planned(self, record: TaskRecord, revision: int, step: StepCompleted) -> None:
        """The manager answered: run its plan if it is valid; else ask once more, saying why, then give up."""
        record.planning_usage = plans.total_usage(record, step.usage)
        task = record.task
        try:
            plan = shared_plans.parse(step.output)
            shared_plans.check(plan, self.policy(), task.tenant, task.user, synthesis=task.spec.agent)
        except shared_plans.PlanInvalid as error:
            if record.plan_mistake:
                await self._end_failed(record, revision, step.step_id, "permanent_error",
                                       f"the manager's plan did not validate, twice: {error}")
                return
            record.plan_mistake = str(error)
            await self._advance(record, revision, step.step_id, strategy=record.strategy, attempt=record.attempt + 1)
            return
        record.plan = plan
        await self._start_plan(record, revision, step.step_id, plan)

    async def _complete(self, step: StepCompleted, fresh: bool) -> None:
        record, revision, cursor = await self._current(step, fresh)
        if record is None:
            return
        if step.gated is not None:  # stopped before a call that needs a person's approval
            await approvals.gate(self, record, revision, cursor, step)
            return
        step_usage = approvals.with_gates(cursor, step.usage)
        if isinstance(cursor, SubtaskState):
            cursor.status, cursor.output, cursor.usage = "completed", step.output, step_usage
            await self._plan_advanced(record, revision, step.step_id)
            return
        if record.phase == "planning":
            await self._planned(record, revision, step)
            return
        strategy = record.chain[record.strategy]
        usage = Usage.sum([plans.total_usage(record, step_usage) if record.subtasks else step_usage,
                           *plans.failed_usage(record)])
        completed = TaskCompleted(task_id=step.task_id, tenant=step.tenant, user=step.user, output=step.output,
                                  usage=usage, attempts=record.steps + sum(sub.steps for sub in record.subtasks),
                                  model=step.model,
                                  strategy=record.strategy, tier=strategy.tier, dependency=step.dependency,
                                  received_at=record.task.received_at)
        record.status, record.usage, record.outcome = "completed", usage, completed
        await self._record(record, revision, step.step_id)
        if record.task.spec.orchestration == "hybrid" and self.boards is not None:
            await self._end_board(record.task.task_ref)
        await self.emit(subjects.task_completed(step.tenant), completed)
        await self._remember(record, completed)

    async def _retry_or_fall_back(self, step: StepFailed, fresh: bool) -> None:
        record, revision, cursor = await self._current(step, fresh)
        if record is None:
            return
        strategy = cursor.chain[cursor.strategy]
        cursor.attempts.append(Attempt(
            step_id=step.step_id, dependency=step.dependency, error=step.error, message=step.message,
            strategy=cursor.strategy, tier=strategy.tier, called=not step.breaker_open, usage=step.usage))
        retry = self.policy().retry
        retry_after = step.retry_after_s or 0.0
        if (step.breaker_open or step.error not in RETRYABLE or cursor.attempt >= strategy.max_attempts
                or retry_after > retry.max_retry_after_s):
            await self._advance(record, revision, step.step_id, strategy=cursor.strategy + 1, attempt=1,
                                cursor=cursor)
            return
        ceiling = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (cursor.attempt - 1))
        wait = max(retry_after, random.uniform(0, ceiling))  # full jitter, never sooner than retry-after
        await self._advance(record, revision, step.step_id, strategy=cursor.strategy, attempt=cursor.attempt + 1,
                            wait=wait, cursor=cursor)

    async def on_overdue(self, ref: str, overdue_step: str, grace_s: float) -> None:
        """The timeout sweep: no outcome came for the step by its deadline plus a grace (no worker took it,
        or every one that did died). Handled as that step's timeout. `ref`: the task's (its record's key)."""
        record, _ = await self.tasks.read(ref)
        cursor = record.cursor_of(overdue_step) if record is not None and record.status == "running" else None
        if cursor is None or not overdue_step:
            return
        strategy = cursor.chain[cursor.strategy]
        await self.on_step_failed(StepFailed(
            task_id=record.task.task_id, tenant=record.task.tenant, user=record.task.user, step_id=overdue_step,
            attempt=cursor.attempt, agent=_agent_of(record, cursor), dependency=dependency_of(strategy),
            error="timeout", message=f"no outcome {grace_s:g} s after the step's deadline: no worker answered"))

    async def task_status(self, tenant: str, task_id: str) -> TaskRecord | None:
        return await self.tasks.get(task_ref(tenant, task_id))

    # --- deciding -----------------------------------------------------------------

    async def _current(self, event: StepCompleted | StepFailed,
                       fresh: bool) -> tuple[TaskRecord | None, int, TaskRecord | SubtaskState]:
        """The task's record, and what in it waits for the event's step (the record's own step or a subtask), if
        anything does; else republish if this event decided it. Only a fresh read may conclude that the event is
        not current: a remembered record may be old."""
        step = event.step_id
        record, revision = await self.tasks.read(event.task_ref, cached=not fresh)
        if record is None and not revision and fresh:
            record, revision = await self._moved_from_legacy_key(event)
        cursor = record.cursor_of(step) if record is not None and record.status == "running" else None
        if not fresh and cursor is None:
            raise _Stale
        if record is None:
            if revision:  # there, and it does not decode
                await self._fail_unreadable(admitted_from(event), revision, step)
            return None, 0, None
        if cursor is not None and cursor is not record:
            return record, revision, cursor
        if record.status == "running" and not record.step_id and record.phase == "single":
            # written before fallback chains: adopt it
            agent = self.policy().agents.get(record.task.spec.agent)
            if agent is None:
                return None, 0, None
            record.step_id, record.chain, record.steps = step, record.chain or agent.chain[:1], record.attempt
            record.deadline_at = record.deadline_at or record.admitted_at + agent.deadline_s
        if record.status != "running" or record.step_id != step or record.phase == "subtasks":
            await self._republish(record, step)  # a redelivery of the event we acted on, or a late duplicate
            return None, 0, None
        return record, revision, record

    async def _moved_from_legacy_key(self, event: StepCompleted | StepFailed) -> tuple[TaskRecord | None, int]:
        """A record an executor wrote before tenants were part of its keys (under the task id alone), moved to
        the task's ref: a task running across the upgrade still ends."""
        record, _ = await self.tasks.read(event.task_id)
        if record is None or record.task.tenant != event.tenant:
            return None, 0
        await self.tasks.write_if(event.task_ref, record, 0)  # unless another replica moved it first
        await self.tasks.kv.delete(event.task_id)
        return await self.tasks.read(event.task_ref)

    async def _advance(self, record: TaskRecord, revision: int, cause: str, *, strategy: int, attempt: int,
                       wait: float = 0.0, cursor: TaskRecord | SubtaskState | None = None) -> None:
        """Decide the next step of `cursor` (the record's own step, or one of its subtasks) from (strategy,
        attempt) on, skipping strategies whose circuit is open; or end it when none is left or the deadline has
        passed: the task, or the subtask (and then the plan decides)."""
        cursor = cursor or record
        ended = await self._schedule(record, revision, cause, cursor, strategy=strategy, attempt=attempt, wait=wait)
        if ended is _ANSWERED:
            return
        if ended is None:
            await self._record(record, revision, cause)
            await self._publish_step(record, cursor)
        elif isinstance(cursor, SubtaskState):
            await self._subtask_failed(record, revision, cause, cursor, *ended)
        else:
            await self._fail(record, revision, cause, *ended)

    async def _schedule(self, record: TaskRecord, revision: int, cause: str, cursor: TaskRecord | SubtaskState, *,
                        strategy: int, attempt: int, wait: float = 0.0) -> tuple[FailReason, str] | object | None:
        """Set `cursor` on its next step (None), or say why it has none left: (reason, error). A cache strategy
        of the task's own chain may answer the task at once (_ANSWERED)."""
        task = record.task
        subtask = (cursor.spec.id if isinstance(cursor, SubtaskState) else
                   {"planning": PLANNING, "synthesis": SYNTHESIS}.get(record.phase, ""))
        while strategy < len(cursor.chain):
            now = self.clock()
            if now >= record.deadline_at:
                return "deadline_exceeded", f"deadline of {record.deadline_at - record.admitted_at:g} s passed"
            if now + wait >= record.deadline_at:  # waiting would outlast the task: try the next strategy now
                strategy, attempt, wait = strategy + 1, 1, 0.0
                continue
            current = cursor.chain[strategy]
            if current.kind == "cache":
                if cursor is record and record.phase == "single" and \
                        await self._answer_from_cache(record, revision, cause, strategy):
                    return _ANSWERED
                strategy, attempt, wait = strategy + 1, 1, 0.0
                continue
            step = step_id(task.tenant, task.task_id, strategy, attempt, subtask)
            tools = cursor.spec.tools if isinstance(cursor, SubtaskState) else \
                task.spec.tools if record.phase == "single" else []
            blocked = await self._blocked(current, tools, step)
            if blocked:
                cursor.attempts.append(Attempt(
                    step_id="", dependency=blocked, error="transient", strategy=strategy, tier=current.tier,
                    called=False, message=f"circuit for {blocked} is open: not called"))
                strategy, attempt, wait = strategy + 1, 1, 0.0
                continue
            cursor.strategy, cursor.attempt, cursor.step_id = strategy, attempt, step
            cursor.steps += 1
            cursor.not_before = now + wait
            cursor.step_deadline = cursor.not_before + min(current.timeout_s, record.deadline_at - cursor.not_before)
            approvals.hold_before(self, record, cursor, _agent_of(record, cursor))
            return None
        # A cache miss says nothing of why the chain failed: the reason is the last other attempt's.
        last = next((a for a in reversed(cursor.attempts) if a.dependency != CACHE_DEPENDENCY),
                    cursor.attempts[-1] if cursor.attempts else None)
        reason: FailReason = ("breaker_open" if last and not last.called else
                              "attempts_exhausted" if last and last.error in RETRYABLE else "permanent_error")
        return reason, f"{last.error}: {last.message}" if last else "no strategy"

    # --- orchestrated tasks (centralized: this executor coordinates) -----------------------------------------

    async def _plan_advanced(self, record: TaskRecord, revision: int, cause: str) -> None:
        """Start every subtask that is ready (within the parallel limit); once all have settled, the synthesis;
        record that, then publish the steps it started."""
        started: list[TaskRecord | SubtaskState] = []
        record.throttled = False
        for sub in plans.ready(record, self.policy().orchestration.max_parallel):
            if not await self._take_slot(record, sub):
                record.throttled = True  # the tenant runs as many subtasks as it may: the sweep tries again
                break
            estimate = self._estimate(record, sub)
            ended = await self._cover(record, sub.spec.id, estimate) or \
                await self._schedule(record, revision, cause, sub, strategy=0, attempt=1)
            if ended is None:
                sub.status, sub.estimate = "running", estimate
                started.append(sub)
            elif plans.plan_of(record).on_failure == "fail_fast":
                await self._subtask_failed(record, revision, cause, sub, *ended)
                return
            else:
                sub.status, sub.error = "failed", ended[1]
        if not started and record.phase == "subtasks" and plans.settled(record):
            if not any(sub.status == "completed" for sub in record.subtasks):
                await self._end_failed(record, revision, cause, "permanent_error", "no subtask of the plan succeeded: "
                                       + "; ".join(f"{sub.spec.id}: {sub.error}" for sub in record.subtasks))
                return
            plan = plans.plan_of(record)
            agent = self.policy().agents.get(plan.synthesis or record.task.spec.agent)
            record.phase, record.chain = "synthesis", list(agent.chain) if agent else []
            ended = await self._cover(record, SYNTHESIS_ID, self._estimate(record, record)) or \
                await self._schedule(record, revision, cause, record, strategy=0, attempt=1)
            if ended is not None:
                await self._fail(record, revision, cause, *ended)
                return
            started.append(record)
        await self._record(record, revision, cause)
        await self._publish_plan(record, started)

    async def _take_slot(self, record: TaskRecord, sub: SubtaskState) -> bool:
        """One of the tenant's slots for running subtasks, until the task's deadline (given back when the subtask
        ends: `_record`)."""
        if self.slots is None:
            return True
        task = record.task
        sub.slot = await self.slots.take(task.tenant, holder(task.task_ref, sub.spec.id), record.deadline_at,
                                         self.clock(), self.policy().orchestration.max_parallel_per_tenant)
        return sub.slot

    async def on_throttled(self, ref: str) -> None:
        """The sweep: a task whose ready subtasks waited for a slot of their tenant's tries to start them again."""
        record, revision = await self.tasks.read(ref)
        if record is None or record.status != "running" or record.phase != "subtasks" or not record.throttled:
            return
        try:
            if self.clock() >= record.deadline_at:
                limit = self.policy().orchestration.max_parallel_per_tenant
                await self._end_failed(record, revision, SLOT_FREED, "deadline_exceeded", (
                    f"the task's deadline passed while its ready subtasks waited: its tenant ran as many subtasks as "
                    f"it may at once ({limit}, max_parallel_per_tenant)"))
                return
            await self._plan_advanced(record, revision, SLOT_FREED)
        except _Stale:
            pass  # another decision came first, and started what it could

    def _estimate(self, record: TaskRecord, part: TaskRecord | SubtaskState) -> int:
        """What a subtask (or, for the record itself, the synthesis) may use: its prompt and its output cap."""
        policy = self.policy()
        if isinstance(part, SubtaskState):
            agent = policy.agents.get(part.spec.agent)
            return part_estimate(plans.subtask_prompt(record, part),
                                 part.spec.max_tokens or (agent.default_output_tokens if agent else 256))
        return part_estimate(plans.synthesis_prompt(record), policy.orchestration.synthesis_output_tokens)

    async def _cover(self, record: TaskRecord, part: str, estimate: int) -> tuple[FailReason, str] | None:
        """Make the task's reservation cover one more part: ask the budget for the shortfall, once per part
        (its answer is idempotent, so deciding again asks again harmlessly). Why not, if it refuses."""
        need = shortfall(plans.reserved(record), plans.committed(record), estimate)
        if self.reserve is None or need == 0 or part in record.extensions:
            return None
        task = record.task
        reply = await self.reserve(ExtendReservation(tenant=task.tenant, user=task.user, task_id=task.task_id,
                                                     part=part, tokens=need))
        if not reply.granted:
            return "over_budget", f"over budget: {part} needs {need:,} tokens more than the task reserved; " \
                                  f"{reply.message}"
        record.extensions[part] = reply.tokens
        return None

    async def _end_board(self, key: str) -> None:
        """Mark a hybrid task's board ended: its synthesis answered and the task completed."""
        board, revision = await self.boards.read(key)
        if board is not None and not board.ended:
            board.ended, board.synthesis.status, board.updated_at = "completed", "completed", self.clock()
            await self.boards.write_if(key, board, revision)  # lost only to a later writer: it ended anyway

    async def _subtask_failed(self, record: TaskRecord, revision: int, cause: str, sub: SubtaskState,
                              reason: FailReason, error: str) -> None:
        sub.status, sub.error = "failed", error
        if plans.plan_of(record).on_failure == "best_effort":
            await self._plan_advanced(record, revision, cause)
            return
        for other in record.subtasks:  # fail_fast: what still runs is cancelled (its outcome no longer counts)
            if other.status in ("waiting", "running"):
                other.status = "cancelled"
        record.attempts = [*record.attempts, *sub.attempts]
        await self._end_failed(record, revision, cause, reason, f"subtask {sub.spec.id} failed: {error}")

    async def _publish_plan(self, record: TaskRecord, started: list[TaskRecord | SubtaskState]) -> None:
        task = record.task
        await self.emit(subjects.task_progress(task.tenant, task.task_id), TaskProgress(
            task_id=task.task_id, tenant=task.tenant, user=task.user, stage="plan", attempt=record.steps,
            step_id=record.decided_by if record.decided_by != task.task_id else "", message=plans.board(record),
            parts=plans.parts(record)))
        for cursor in started:
            await self._publish_step(record, cursor)

    async def _blocked(self, strategy: Strategy, tools: list[str], step: str) -> str | None:
        """The dependency whose open circuit forbids this step, if any. Tools in half-open are the
        worker's to probe (it calls them); the model is probed here, with a lease, before asking for the step."""
        for tool in tools:
            if self.gate.admission(tool_key(tool)) == "skip":
                return tool_key(tool)
        model = dependency_of(strategy)
        return None if await self.gate.permits(model, step) else model

    async def _answer_from_cache(self, record: TaskRecord, revision: int, cause: str, strategy: int) -> bool:
        current = record.chain[strategy]
        answer = await self.cache.get(cache_key(record.task)) if self.cache else None
        if answer is None:
            record.attempts.append(Attempt(step_id="", dependency=CACHE_DEPENDENCY, error="permanent",
                                           strategy=strategy, tier=current.tier,
                                           message="no cached answer for this agent and prompt"))
            return False
        task = record.task
        completed = TaskCompleted(task_id=task.task_id, tenant=task.tenant, user=task.user, output=answer.output,
                                  usage=Usage(input_tokens=0, output_tokens=0), attempts=record.steps,
                                  model=answer.model, strategy=strategy, tier=current.tier,
                                  dependency=CACHE_DEPENDENCY, received_at=task.received_at)
        record.status, record.strategy, record.outcome = "completed", strategy, completed
        record.usage = completed.usage
        await self._record(record, revision, cause)
        await self.emit(subjects.task_completed(task.tenant), completed)
        return True

    async def _fail(self, record: TaskRecord, revision: int, cause: str, reason: FailReason, last_error: str) -> None:
        error = last_error if reason == "over_budget" else f"All strategies failed. Last error: {last_error}"
        await self._end_failed(record, revision, cause, reason, error)

    async def _fail_unreadable(self, task: TaskAdmitted, revision: int, cause: str) -> None:
        """Fail a task whose record does not decode, writing the failure over that record."""
        record = TaskRecord(task=task, admitted_at=self.clock())
        await self._end_failed(record, revision, cause, "permanent_error", UNREADABLE)

    async def _end_failed(self, record: TaskRecord, revision: int, cause: str, reason: FailReason,
                          error: str) -> None:
        task = record.task
        failed = TaskFailed(task_id=task.task_id, tenant=task.tenant, user=task.user, reason=reason, error=clip(error),
                            attempts=record.attempts, received_at=task.received_at,
                            usage=plans.spent_by_failed(record))
        record.status, record.outcome = "failed", failed
        await self._record(record, revision, cause)
        await self.emit(subjects.task_failed(task.tenant), failed)

    async def _record(self, record: TaskRecord, revision: int, cause: str) -> None:
        """Store the decision (compare-and-set); _Stale if the task's record changed since it was read."""
        record.decided_by, record.decided_at = cause, self.clock()
        freed = plans.free_slots(record)
        if not await self.tasks.write_if(record.task.task_ref, record, revision):
            raise _Stale
        for sub in freed if self.slots else []:  # once recorded: a crash here leaves them to lapse at the deadline
            await self.slots.give_back(record.task.tenant, holder(record.task.task_ref, sub.spec.id))
        if record.status != "running":
            self.tasks.forget(record.task.task_ref)  # ended: this process will not write it again

    # --- publishing -----------------------------------------------------------------

    async def _republish(self, record: TaskRecord, cause: str) -> None:
        if record.decided_by != cause or self.clock() - record.decided_at > self.republish_window_s:
            return
        if isinstance(record.outcome, TaskCompleted):
            await self.emit(subjects.task_completed(record.task.tenant), record.outcome)
        elif isinstance(record.outcome, TaskFailed):
            await self.emit(subjects.task_failed(record.task.tenant), record.outcome)
        elif record.status == "running":
            for step, _ in record.running_steps():
                await self._publish_step(record, record.cursor_of(step))

    async def _publish_step(self, record: TaskRecord, cursor: TaskRecord | SubtaskState | None = None) -> None:
        task, cursor = record.task, cursor or record
        if approvals.waits_to_start(cursor):  # a person approves it first
            await approvals.ask_to_start(self, record, cursor, _agent_of(record, cursor))
            return
        strategy = cursor.chain[cursor.strategy]
        if cursor.steps > 1:
            last = cursor.attempts[-1] if cursor.attempts else None
            stage = "retrying" if cursor.attempt > 1 else "fallback"
            why = f"{last.dependency} {last.error}: {last.message}" if last else "previous step failed"
            of = f" of subtask {cursor.spec.id}" if isinstance(cursor, SubtaskState) else ""
            await self.emit(subjects.task_progress(task.tenant, task.task_id), TaskProgress(
                task_id=task.task_id, tenant=task.tenant, user=task.user, stage=stage, attempt=cursor.steps,
                step_id=cursor.step_id,
                message=clip(f"{why}; {stage}{of} on strategy {cursor.strategy} ({strategy.tier} "
                             f"{dependency_of(strategy)}), attempt {cursor.attempt}")))
        await self.sleep(max(0.0, cursor.not_before - self.clock()))
        common = dict(task_id=task.task_id, tenant=task.tenant, user=task.user, step_id=cursor.step_id,
                      attempt=cursor.attempt, provider=strategy.provider, model=strategy.model,
                      strategy=cursor.strategy, tier=strategy.tier, deadline_at=cursor.step_deadline,
                      timeout_s=cursor.step_deadline - cursor.not_before)
        if isinstance(cursor, SubtaskState):
            prompt = plans.subtask_prompt(record, cursor)
            agent = self.policy().agents.get(cursor.spec.agent)
            request = StepRequested(**common, agent=cursor.spec.agent, prompt=prompt, subtask=cursor.spec.id,
                                    max_tokens=cursor.spec.max_tokens or (agent.default_output_tokens if agent else 256),
                                    tools=cursor.spec.tools)
        elif record.phase == "synthesis":
            request = StepRequested(**common, agent=_agent_of(record, record), prompt=plans.synthesis_prompt(record),
                                    max_tokens=self.policy().orchestration.synthesis_output_tokens)
        elif record.phase == "planning":
            policy = self.policy()
            prompt = shared_plans.request(task.spec.prompt, sorted(policy.agents), policy.orchestration.max_subtasks,
                                          record.plan_mistake)
            manager = policy.agents.get(task.spec.agent)
            request = StepRequested(**common, agent=task.spec.agent, prompt=prompt,
                                    max_tokens=task.spec.max_tokens or (manager.default_output_tokens if manager else 256))
        else:
            request = StepRequested(**common, agent=task.spec.agent, prompt=task.spec.prompt,
                                    messages=task.spec.chat(), max_tokens=task.estimate.max_output_tokens,
                                    tools=task.spec.tools)
        request = approvals.gated_request(record, cursor, request)
        part = request.subtask or {"planning": "plan", "synthesis": "synthesis"}.get(record.phase, "")
        if not part:
            await self.emit(subjects.step_requested(request.agent), request)
            return
        # An orchestrated task's part is a span of its own, the step's parent: the trace shows the fan-out.
        with tracing.span(f"{'subtask ' + part if request.subtask else part} {request.agent}", {
                "corral.task_id": task.task_id, "corral.part": part, "gen_ai.agent.name": request.agent}):
            await self.emit(subjects.step_requested(request.agent), request)

    async def _remember(self, record: TaskRecord, completed: TaskCompleted) -> None:
        """Keep the answer for a chain that can fall back to the cache."""
        if self.cache and any(strategy.kind == "cache" for strategy in record.chain):
            await self.cache.put(cache_key(record.task), CachedAnswer(
                output=completed.output, model=completed.model, dependency=completed.dependency,
                stored_at=self.clock()))
