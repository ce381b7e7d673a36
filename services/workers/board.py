"""A pool member's part in distributed and hybrid tasks: claim what its agent kind may do on a task's board, run
it as a step, renew the claim while it runs, and post the result; in distributed mode, end the task.

Every worker replica of agent kind A is a pool member. It follows every board (`corral_boards`) and, for each one
not ended, claims with one compare-and-set an entry of kind A that is

- `waiting` with every need `completed` (under `best_effort`: every need ended, completed or failed), or
- `claimed` with its `claim_expires` in the past (its holder died, or was cut off: its claim is taken over);
- in distributed mode, the synthesis (agent = its entry's), once every subtask has ended and one completed.

A claim sets the entry `claimed` by this member until now + `claim_lease_s`, counts it (`claims`) and touches
the board (`updated_at`). A lost compare-and-set is normal: the member reads the board again and decides again.
A board holds at most `max_parallel` live claims (the limit is part of the claim's compare-and-set, so it is
exact over every member), and a member holds at most `max_parallel` claims over every board; it claims only
what it can start at once, never to wait.

The claimed entry runs as a step through the worker's own `Worker.on_step` (breakers, tools, streaming, and the
StepCompleted the budget posts, once per step id), down the agent's fallback chain: each model strategy up to
its `max_attempts` on retryable errors, with the policy's backoff, then the next; `cache` strategies are skipped
(the answer cache is the executor's). Step ids are `<tenant>/<task>-<entry>-c<claim>s<strategy>a<attempt>`:
each claim's steps are its own. While the chain runs the member renews its claim every third of the lease; a
renewal that finds the claim no longer its own (taken over, or the board ended) abandons the work: the step
under way finishes (its usage is real, and posted), no other is started, and nothing goes on the board.

The result is posted by a compare-and-set that requires the claim still be the member's own (same holder, same
claim number): the entry `completed` with its output, usage and step id, or `failed` with its error. Under
`fail_fast` the write that records a failure also ends the board (`failed`), and its writer publishes
TaskFailed; a board on which every subtask failed ends the same way. The synthesis's holder marks it completed
and the board `ended = "completed"` in one write, and only then publishes TaskCompleted: a writer whose
compare-and-set finds the board ended publishes nothing, so a task ends once.

In distributed mode (hybrid boards have the executor to supervise them) any member also ends a board that has
passed its deadline, or that nothing changed on for `stall_s` (no claim, renewal or result: e.g. a subtask for
an agent kind no worker runs), and publishes TaskFailed saying what was done.

Two guard rails hold for every claim, as for the executor's own subtasks. Before it claims a subtask, the member
takes one of the tenant's slots for running subtasks (shared.slots: `max_parallel_per_tenant` over every task),
named after the claim, given back when its work ends; with none free it claims nothing and looks again soon. And
before the first step, the part's estimate (its prompt and output cap, written with the claim) is checked against
what the task holds: the shortfall is asked of the budget (shared.reservations), and a refusal fails the entry
`over_budget`.

A member that dies loses nothing: its claims lapse and other members take them over. One that is stopped lets its
claims lapse at once (a last compare-and-set), so the others need not wait out the lease.

The rules are pure functions of a board; `Pool` applies them with the bucket and the publisher it is given.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
import msgspec
from nats.errors import Error as NatsError

from contracts import (
    RETRYABLE,
    Attempt,
    StepCompleted,
    StepFailed,
    StepRequested,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    Usage,
    subjects,
)
from contracts.boards import SYNTHESIS_ID, Board, Entry
from contracts.commands import ExtendReservation
from contracts.events import FailReason, PartState, clip
from contracts.policy import Policy, Strategy
from contracts.state import dependency_key
from shared import plans, tracing
from shared.errors import PoisonMessage, TransientError
from shared.kv import TypedBucket
from shared.reservations import Reserve, part_estimate, shortfall
from shared.slots import Slots
from shared.slots import holder as slot_holder

log = logging.getLogger(__name__)
Emit = Callable[[str, Any], Awaitable[None]]
Clock = Callable[[], float]
RunStep = Callable[[StepRequested], Awaitable[StepCompleted | StepFailed]]
R = TypeVar("R")

THROTTLED_RETRY_S = 0.5
"""How soon a member that found its tenant's slots taken looks again (another task's subtask may have ended)."""
IDLE_S = 5.0
"""The claim loop looks at its boards at least this often without news (a policy change shows within it)."""
CAS_TRIES = 16
"""Compare-and-sets of one decision before it is given up for now (the next look decides again)."""
PUBLISH_TRIES = 12
RELEASE_TIMEOUT_S = 2.0
_NATS_ERRORS = (NatsError, TimeoutError, TransientError)
_board = msgspec.json.Decoder(Board)


# --- the rules: pure functions of a board -------------------------------------------------------------------

ENDED = ("completed", "failed")


def entry_of(board: Board, entry_id: str) -> Entry | None:
    """The subtask of that id, or the synthesis for SYNTHESIS_ID (known by its place on the board, whatever its
    spec's id says)."""
    if entry_id == SYNTHESIS_ID:
        return board.synthesis
    return next((entry for entry in board.entries if entry.spec.id == entry_id), None)


def with_entry(board: Board, entry_id: str, entry: Entry, now: float, **changes: Any) -> Board:
    """`board` with `entry` in the place of `entry_id`, touched at `now`."""
    if entry_id == SYNTHESIS_ID:
        return msgspec.structs.replace(board, synthesis=entry, updated_at=now, **changes)
    entries = [entry if old.spec.id == entry_id else old for old in board.entries]
    return msgspec.structs.replace(board, entries=entries, updated_at=now, **changes)


def is_ready(board: Board, entry: Entry) -> bool:
    """Every need of `entry` has completed (under best_effort: ended at all). A need not on the board never is."""
    by_id = {other.spec.id: other.status for other in board.entries}
    wanted = ENDED if board.on_failure == "best_effort" else ("completed",)
    return all(by_id.get(need) in wanted for need in entry.spec.needs)


def synthesis_ready(board: Board) -> bool:
    """Distributed: every subtask has ended and at least one completed."""
    return (board.mode == "distributed" and all(entry.status in ENDED for entry in board.entries)
            and any(entry.status == "completed" for entry in board.entries))


def live_claims(board: Board, now: float) -> int:
    return sum(entry.status == "claimed" and entry.claim_expires > now for entry in (*board.entries, board.synthesis))


def _claimable(entry: Entry, now: float) -> bool:
    return entry.status == "waiting" or (entry.status == "claimed" and entry.claim_expires <= now)


def open_to(board: Board, agent: str, now: float, max_parallel: int) -> list[tuple[str, Entry]]:
    """The entries (id, entry) the pool of `agent` may claim on `board` now, within its limit of live claims."""
    if board.ended:
        return []
    found = [(entry.spec.id, entry) for entry in board.entries if entry.spec.agent == agent
             and _claimable(entry, now) and (entry.status == "claimed" or is_ready(board, entry))]
    if board.synthesis.spec.agent == agent and _claimable(board.synthesis, now) and synthesis_ready(board):
        found.append((SYNTHESIS_ID, board.synthesis))
    return found[:max(0, max_parallel - live_claims(board, now))]


def claimed(board: Board, entry_id: str, member: str, now: float, lease_s: float, estimate: int = 0) -> Board:
    entry = entry_of(board, entry_id)
    assert entry is not None
    return with_entry(board, entry_id, msgspec.structs.replace(
        entry, status="claimed", claimed_by=member, claim_expires=now + lease_s, claims=entry.claims + 1,
        estimate=estimate), now)


def reserved(board: Board) -> int:
    """What the task holds: its reservation at admission and what its parts added since."""
    return board.task.reserved_tokens + sum(entry.extended for entry in (*board.entries, board.synthesis))


def committed(board: Board) -> int:
    """Tokens the task's parts used (those that answered) or may use (those claimed, by their estimate)."""
    return sum(entry.usage.total if entry.usage else entry.estimate if entry.status == "claimed" else 0
               for entry in (*board.entries, board.synthesis))


def holds(board: Board, entry_id: str, member: str, claim: int) -> bool:
    """`member`'s claim number `claim` on the entry is still the entry's claim, on a board not ended."""
    entry = entry_of(board, entry_id)
    return (not board.ended and entry is not None and entry.status == "claimed" and entry.claimed_by == member
            and entry.claims == claim)


def renewed(board: Board, entry_id: str, member: str, claim: int, now: float, lease_s: float) -> Board | None:
    """The board with the claim's lease renewed; None if the claim is no longer the member's."""
    if not holds(board, entry_id, member, claim):
        return None
    entry = entry_of(board, entry_id)
    return with_entry(board, entry_id, msgspec.structs.replace(entry, claim_expires=now + lease_s), now)


def released(board: Board, entry_id: str, member: str, claim: int, now: float) -> Board | None:
    """The board with the member's claim lapsed at once (it stops), for the next member to take over."""
    if not holds(board, entry_id, member, claim):
        return None
    entry = entry_of(board, entry_id)
    return with_entry(board, entry_id, msgspec.structs.replace(entry, claim_expires=now), now)


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """An entry's chain answered: the step that did, and its strategy."""

    step: StepCompleted
    strategy: int
    tier: str
    steps: int
    """Steps this claim ran, the answering one included."""
    spent: Usage | None = None
    """What this claim's failed steps used before the answer (billed too)."""


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """An entry's chain gave up: why, in the words TaskFailed uses."""

    reason: FailReason
    error: str
    attempts: list[Attempt] = []
    spent: Usage | None = None
    """What this claim's failed steps used (billed too)."""


def answered(board: Board, entry_id: str, outcome: Answer | Failure, now: float,
             extended: int = 0) -> tuple[Board, TaskCompleted | TaskFailed | None]:
    """The board with the entry's result (and what the budget reserved for it beyond the task's reservation),
    and the task's end when this result ends it: the synthesis answered (completed), the synthesis or, under
    fail_fast, a subtask failed, or every subtask failed (failed)."""
    entry = entry_of(board, entry_id)
    assert entry is not None
    ran = outcome.steps if isinstance(outcome, Answer) else len(outcome.attempts)
    entry = msgspec.structs.replace(entry, extended=extended, steps=entry.steps + ran)
    if isinstance(outcome, Answer):
        entry = msgspec.structs.replace(entry, status="completed", output=outcome.step.output,
                                        usage=Usage.sum([outcome.spent, outcome.step.usage]),
                                        step_id=outcome.step.step_id, error="")
    else:
        entry = msgspec.structs.replace(entry, status="failed", error=clip(outcome.error), usage=outcome.spent,
                                        step_id=outcome.attempts[-1].step_id if outcome.attempts else "")
    after = with_entry(board, entry_id, entry, now)
    end: TaskCompleted | TaskFailed | None = None
    if entry_id == SYNTHESIS_ID:
        end = (completion(after, outcome) if isinstance(outcome, Answer) else
               failure(after, outcome.reason, f"the synthesis failed: {outcome.error}", outcome.attempts))
    elif isinstance(outcome, Failure) and board.on_failure == "fail_fast":
        end = failure(after, outcome.reason, f"subtask {entry_id} failed: {outcome.error}", outcome.attempts)
    elif isinstance(outcome, Failure) and all(other.status == "failed" for other in after.entries):
        end = failure(after, "permanent_error", "no subtask of the plan succeeded: "
                      + "; ".join(f"{other.spec.id}: {other.error}" for other in after.entries), outcome.attempts)
    if end is not None:
        after = msgspec.structs.replace(after, ended="completed" if isinstance(end, TaskCompleted) else "failed",
                                        outcome=end)
    return after, end


def overdue(board: Board, now: float, stall_s: float) -> tuple[FailReason, str] | None:
    """Distributed: why the board must end now (its deadline passed, or nothing changed on it for stall_s)."""
    if board.ended or board.mode != "distributed":
        return None
    if 0 < board.deadline_at <= now:
        return "deadline_exceeded", (f"the task's deadline passed ({board.deadline_at - board.created_at:g} s after "
                                     f"its board was made); {progress(board)}")
    if board.updated_at + stall_s < now:
        return "deadline_exceeded", f"the board stalled: nothing changed for {stall_s:g} s; {progress(board)}"
    return None


def stopped(board: Board, now: float, stall_s: float) -> tuple[Board, TaskFailed] | None:
    """The board ended as overdue, and its TaskFailed; None if it is not overdue."""
    why = overdue(board, now, stall_s)
    if why is None:
        return None
    after = msgspec.structs.replace(board, ended="failed", updated_at=now)
    end = failure(after, *why)
    return msgspec.structs.replace(after, outcome=end), end


def next_due(board: Board, agent: str, now: float, stall_s: float) -> float:
    """When, with no change on it, `board` next needs looking at: a claim of `agent`'s kind lapses, or (distributed)
    it would stall or reach its deadline."""
    if board.ended:
        return math.inf
    times = [entry.claim_expires for entry in (*board.entries, board.synthesis)
             if entry.spec.agent == agent and entry.status == "claimed" and entry.claim_expires > now]
    if board.mode == "distributed":
        times.append(board.updated_at + stall_s)
        if board.deadline_at > 0:
            times.append(board.deadline_at)
    return min(times, default=math.inf)


def progress(board: Board) -> str:
    """What was done and what was not, in words: for a task that ends without its synthesis."""
    done = [entry.spec.id for entry in board.entries if entry.status == "completed"]
    failed = [f"{entry.spec.id} ({entry.error})" for entry in board.entries if entry.status == "failed"]
    undone = [f"{entry.spec.id} ({entry.spec.agent}, {_state(entry)})" for entry in board.entries
              if entry.status not in ENDED]
    if board.synthesis.status not in ENDED:
        undone.append(f"the synthesis ({board.synthesis.spec.agent}, {_state(board.synthesis)})")
    words = [f"done: {', '.join(done) or 'nothing'}"]
    words += [f"failed: {', '.join(failed)}"] if failed else []
    words += [f"not done: {', '.join(undone)}"] if undone else []
    return "; ".join(words)


def _state(entry: Entry) -> str:
    return f"claimed by {entry.claimed_by}" if entry.status == "claimed" else entry.status


def line(board: Board) -> str:
    """One line of the board: each subtask's id and status, then the synthesis's (as centralized progress)."""
    states = ", ".join(f"{entry.spec.id} {entry.status}" for entry in board.entries)
    return f"subtasks: {states}; synthesis {board.synthesis.status}"


def parts(board: Board) -> list[PartState]:
    """Every entry's state, for progress (a claim is `running`)."""
    return [PartState(id=entry_id, agent=entry.spec.agent,
                      status="running" if entry.status == "claimed" else entry.status,
                      tokens=entry.usage.total if entry.usage else 0)
            for entry_id, entry in [*((e.spec.id, e) for e in board.entries), (SYNTHESIS_ID, board.synthesis)]]


def completion(board: Board, answer: Answer) -> TaskCompleted:
    """The task's end from its synthesis's answer: its output, every entry's usage and the synthesis's."""
    task, step = board.task, answer.step
    return TaskCompleted(
        task_id=task.task_id, tenant=task.tenant, user=task.user, output=step.output,
        usage=Usage.sum([board.planning_usage, *(entry.usage for entry in board.entries), step.usage]),
        attempts=board.planning_steps + sum(entry.steps for entry in board.entries) + answer.steps, model=step.model,
        strategy=answer.strategy, tier=answer.tier, dependency=step.dependency,
        received_at=task.received_at)


def failure(board: Board, reason: FailReason, error: str, attempts: Iterable[Attempt] = ()) -> TaskFailed:
    task = board.task
    return TaskFailed(task_id=task.task_id, tenant=task.tenant, user=task.user, reason=reason, error=clip(error),
                      attempts=list(attempts), received_at=task.received_at)


# --- what a claimed entry's step is told ---------------------------------------------------------------------


def step_id(board: Board, entry_id: str, claim: int, strategy: int, attempt: int) -> str:
    """`<tenant>/<task>-<entry>-c<claim>s<strategy>a<attempt>`: distinct for each claim, strategy and attempt."""
    task = board.task
    return f"{task.tenant}/{task.task_id}-{entry_id}-c{claim}s{strategy}a{attempt}"


def subtask_prompt(board: Board, entry: Entry) -> str:
    return plans.subtask_prompt(board.task.spec.prompt, entry, {other.spec.id: other for other in board.entries})


def synthesis_prompt(board: Board) -> str:
    return plans.synthesis_prompt(board.task.spec.prompt, board.entries)


def part_of(board: Board, entry_id: str, policy: Policy) -> tuple[str, int]:
    """What the entry's agent is told, and the output tokens it may write."""
    entry = entry_of(board, entry_id)
    assert entry is not None
    if entry_id == SYNTHESIS_ID:
        return synthesis_prompt(board), entry.spec.max_tokens or policy.orchestration.synthesis_output_tokens
    agent = policy.agents.get(entry.spec.agent)
    return subtask_prompt(board, entry), entry.spec.max_tokens or (agent.default_output_tokens if agent else 256)


def step_request(board: Board, entry_id: str, claim: int, index: int, strategy: Strategy, attempt: int,
                 policy: Policy, now: float) -> StepRequested:
    """The step of one attempt of a claimed entry, bounded by the strategy's timeout and the task's deadline."""
    task, entry = board.task, entry_of(board, entry_id)
    assert entry is not None
    timeout = max(0.0, strategy.timeout_s if board.deadline_at <= 0 else
                  min(strategy.timeout_s, board.deadline_at - now))
    prompt, max_tokens = part_of(board, entry_id, policy)
    synthesis = entry_id == SYNTHESIS_ID
    return StepRequested(
        task_id=task.task_id, tenant=task.tenant, user=task.user,
        step_id=step_id(board, entry_id, claim, index, attempt), attempt=attempt, agent=entry.spec.agent,
        provider=strategy.provider, model=strategy.model, prompt=prompt,
        max_tokens=max_tokens, strategy=index, tier=strategy.tier, tools=list(entry.spec.tools),
        timeout_s=timeout, deadline_at=now + timeout, subtask="" if synthesis else entry_id,
        gated_tools=[tool for tool in entry.spec.tools if tool in task.high_stakes_tools])


# --- the worker's steps, run by a pool member ------------------------------------------------------------------


class StepOutcomes:
    """The worker's `emit`, which also keeps the outcome of each step a pool member runs: `Worker.on_step`
    publishes it as for any step (the budget posts it, the breaker counts its calls), and `run` hands it back."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._kept: dict[str, tuple[str, StepCompleted | StepFailed] | None] = {}

    async def emit(self, subject: str, event: Any) -> None:
        if isinstance(event, (StepCompleted, StepFailed)) and event.step_id in self._kept:
            self._kept[event.step_id] = (subject, event)
        await self._emit(subject, event)

    def runner(self, on_step: Callable[[StepRequested], Awaitable[None]]) -> RunStep:
        async def run(step: StepRequested) -> StepCompleted | StepFailed:
            self._kept[step.step_id] = None
            try:
                try:
                    await on_step(step)
                except PoisonMessage as refused:  # e.g. no such provider in this worker: nothing was called
                    return StepFailed(task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id,
                                      attempt=step.attempt, agent=step.agent,
                                      dependency=dependency_key(step.provider, step.model), error="permanent",
                                      message=clip(str(refused)), calls=[])
                except TransientError:
                    kept = self._kept.get(step.step_id)
                    if kept is None:
                        raise
                    await _surely(self._emit, *kept)  # the step ran: its outcome must reach the budget
                kept = self._kept[step.step_id]
                assert kept is not None, "Worker.on_step returned without publishing the step's outcome"
                return kept[1]
            finally:
                self._kept.pop(step.step_id, None)

        return run


async def _surely(emit: Emit, subject: str, event: Any) -> None:
    """Publish, trying again on a transient failure (the stream drops a repeat by its message id)."""
    for attempt in range(PUBLISH_TRIES):
        try:
            await emit(subject, event)
            return
        except TransientError:
            if attempt == PUBLISH_TRIES - 1:
                raise
            await anyio.sleep(min(5.0, 0.1 * 2 ** attempt))


# --- the pool member ---------------------------------------------------------------------------------------------


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """A claim this member won: on which board and entry, its number, and the board as it was claimed."""

    key: str
    entry_id: str
    claim: int
    board: Board
    slot: str = ""
    """The tenant slot it holds (shared.slots), given back when its work ends; "" for none."""


class PoolStats(msgspec.Struct):
    open_boards: int = 0
    """Boards not ended that this member sees."""
    holding: int = 0
    """Claims held now."""
    claims: int = 0
    takeovers: int = 0
    """Claims of an entry whose previous claim had lapsed."""
    lost_claims: int = 0
    """Claims another member's compare-and-set beat (normal)."""
    renewals: int = 0
    abandoned: int = 0
    """Claims found taken over (or the board ended) while their work ran: their results were not posted."""
    completed: int = 0
    failed: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    """Tasks this member ended as failed: a failed subtask, the synthesis, a deadline or a stall."""
    overdue: int = 0
    """Boards this member ended as stalled or past their deadline."""
    throttled: int = 0
    """Claims not made because the subtask's tenant ran as many subtasks as it may (max_parallel_per_tenant)."""
    errors: int = 0
    """Looks at a board, renewals, posts or publishes that failed (NATS away, contention): each is logged."""


class Pool:
    """One pool member of agent kind `agent`: `apply` is the boards bucket's watch, `run` the claim loop (its
    holds run in its task group)."""

    def __init__(self, agent: str, member: str, boards: TypedBucket[Board], run_step: RunStep, emit: Emit, *,
                 policy: Callable[[], Policy], notify: Emit | None = None, reserve: Reserve | None = None,
                 slots: Slots | None = None, clock: Clock = time.time) -> None:
        self.agent = agent
        self.member = member
        """Who holds a claim (`claimed_by`): unique per member, even for two in one process."""
        self.boards = boards
        self.run_step = run_step
        self.emit = emit
        self.notify = notify or emit
        self.policy = policy
        self.reserve = reserve
        """Asks the budget for more when a claimed part would take its task past its reservation."""
        self.slots = slots
        """Each tenant's running subtasks, over every task (None: no per-tenant limit)."""
        self._throttled = False
        self.clock = clock
        self.view: dict[str, tuple[Board, int]] = {}
        """Every board not ended, with its revision, as the watch (or this member's last write) left it."""
        self.stats = PoolStats()
        self._news = anyio.Event()
        self._stopping = False

    # --- the boards' watch ---

    def apply(self, key: str, value: bytes | None, revision: int) -> None:
        known = self.view.get(key)
        if known is not None and revision <= known[1]:
            return  # this member's own write, seen already
        if value is None:
            self.view.pop(key, None)
            self.stats.open_boards = len(self.view)
        else:
            self._keep(key, _board.decode(value), revision)  # a DecodeError: the watch quarantines it
        self._news.set()

    def _keep(self, key: str, board: Board, revision: int) -> None:
        if board.ended:
            self.view.pop(key, None)
        else:
            self.view[key] = (board, revision)
        self.stats.open_boards = len(self.view)

    def snapshot(self) -> dict:
        return msgspec.structs.asdict(self.stats)

    # --- the claim loop ---

    async def run(self, stop: anyio.Event) -> None:
        async with anyio.create_task_group() as holds:
            holds.start_soon(self._wake_on, stop)
            while not stop.is_set():
                self._news = anyio.Event()
                due = await self.look(holds)
                with anyio.move_on_after(max(0.0, min(due - self.clock(), IDLE_S))):
                    await self._news.wait()
            holds.cancel_scope.cancel()

    async def _wake_on(self, stop: anyio.Event) -> None:
        await stop.wait()
        self._stopping = True
        self._news.set()

    async def look(self, holds: anyio.abc.TaskGroup) -> float:
        """One pass over the boards: end what is overdue, claim what may be claimed (each claim's work starts in
        `holds`); when to look again without news."""
        due, self._throttled = math.inf, False
        for key, (board, _) in list(self.view.items()):
            if self._stopping:
                break
            limits = self.policy().orchestration
            try:
                if overdue(board, self.clock(), limits.stall_s) is not None:
                    await self._stop_board(key)
                    continue
                while key in self.view and (won := await self.claim_next(key, *self.view[key])) is not None:
                    holds.start_soon(self._hold, won)
            except _NATS_ERRORS as exc:
                self.stats.errors += 1
                log.warning("board %s: %r; looking again soon", key, exc)
                due = min(due, self.clock() + 1.0)
            if key in self.view:
                due = min(due, next_due(self.view[key][0], self.agent, self.clock(), limits.stall_s))
        return min(due, self.clock() + THROTTLED_RETRY_S) if self._throttled else due

    async def claim_next(self, key: str, board: Board, revision: int) -> Claim | None:
        """Claim the first entry open to this member on `board` (known at `revision`), if it has room for one; a
        lost compare-and-set reads the board again and decides again. The claim won, if any."""
        for _ in range(CAS_TRIES):
            limits, now = self.policy().orchestration, self.clock()
            if self.stats.holding >= limits.max_parallel or self._stopping:
                return None
            found = open_to(board, self.agent, now, limits.max_parallel)
            if not found:
                return None
            entry_id, entry = found[0]
            slot = await self._take_slot(board, entry_id, entry.claims + 1, now, limits.max_parallel_per_tenant)
            if slot is None:
                self.stats.throttled += 1
                self._throttled = True
                return None  # the tenant runs as many subtasks as it may: looked at again soon
            after = claimed(board, entry_id, self.member, now, limits.claim_lease_s,
                            part_estimate(*part_of(board, entry_id, self.policy())))
            if await self.boards.write_if(key, after, revision):
                self.stats.holding += 1  # the slot is taken with the claim, before anything else may look
                self.stats.claims += 1
                await self._wrote(key)
                self.stats.takeovers += entry.status == "claimed"
                if entry.status == "claimed":
                    log.info("task %s: %s's claim on %s lapsed; %s takes it over", board.task.task_id,
                             entry.claimed_by, entry_id, self.member)
                return Claim(key=key, entry_id=entry_id, claim=entry.claims + 1, board=after, slot=slot)
            self.stats.lost_claims += 1
            await self._give_back(board, slot)
            fresh, revision = await self.boards.read(key)
            if fresh is None:
                return None
            board = fresh
        return None  # contended for now: the next look decides again

    async def _take_slot(self, board: Board, entry_id: str, claim: int, now: float, limit: int) -> str | None:
        """One of the tenant's slots for running subtasks (none for the synthesis), held by this claim until the
        task's deadline: its holder's name, "" if it needs none, None if none is free."""
        if self.slots is None or entry_id == SYNTHESIS_ID:
            return ""
        task = board.task
        who = slot_holder(task.task_ref, f"{entry_id}-c{claim}")
        until = board.deadline_at if board.deadline_at > 0 else now + self.policy().orchestration.stall_s
        return who if await self.slots.take(task.tenant, who, until, now, limit) else None

    async def _give_back(self, board: Board, slot: str) -> None:
        if slot and self.slots is not None:
            await self.slots.give_back(board.task.tenant, slot)

    async def _wrote(self, key: str) -> None:
        """Put what this member just wrote in its view (as the watch will, later)."""
        board, revision = await self.boards.read(key, cached=True)
        if board is not None and revision > self.view.get(key, (None, 0))[1]:
            self._keep(key, board, revision)

    async def _change(self, key: str,
                      decide: Callable[[Board, float], tuple[Board, R] | None]) -> tuple[Board, R] | None:
        """Read the board, `decide` on it (None: nothing to write), write that by compare-and-set, and again on a
        conflict: (the board written, what `decide` gave with it), or None if it decided nothing."""
        for attempt in range(CAS_TRIES):
            board, revision = await self.boards.read(key)
            decided = decide(board, self.clock()) if board is not None else None
            if decided is None:
                return None
            if await self.boards.write_if(key, decided[0], revision):
                await self._wrote(key)
                return decided
            await anyio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 8)))
        raise TransientError(f"board {key} stayed contended for {CAS_TRIES} compare-and-sets")

    async def _stop_board(self, key: str) -> None:
        """End an overdue board (one writer wins) and publish its TaskFailed."""
        stall_s = self.policy().orchestration.stall_s
        ended = await self._change(key, lambda board, now: stopped(board, now, stall_s))
        if ended is not None:
            self.stats.overdue += 1
            log.warning("task %s failed: %s", ended[1].task_id, ended[1].error)
            await self._publish_end(ended[1])

    # --- a claim's work ---

    async def _hold(self, claim: Claim) -> None:
        task = claim.board.task.task_id
        try:
            lost = anyio.Event()
            with _part_span(claim):  # its steps, its result and the task's end, if it ends it, in the task's trace
                async with anyio.create_task_group() as renewing:
                    renewing.start_soon(self._renew, claim, lost)
                    covered = await self._cover(claim)
                    outcome = covered if isinstance(covered, Failure) else await self._work(claim, lost)
                    renewing.cancel_scope.cancel()
                if outcome is None or lost.is_set():
                    self.stats.abandoned += 1
                    log.info("task %s: %s's claim %d on %s was taken over or its board ended: result dropped", task,
                             self.member, claim.claim, claim.entry_id)
                    return
                await self._post(claim, outcome, extended=covered if isinstance(covered, int) else 0)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
                await self._release(claim)
            raise
        except Exception:  # noqa: BLE001 - one claim's trouble must not stop the pool: logged, counted, left to lapse
            self.stats.errors += 1
            log.exception("task %s: claim %d on %s failed; it will lapse for another member", task, claim.claim,
                          claim.entry_id)
        finally:
            self.stats.holding -= 1
            self._news.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
                try:
                    await self._give_back(claim.board, claim.slot)
                except _NATS_ERRORS:  # it lapses at the task's deadline
                    pass

    async def _renew(self, claim: Claim, lost: anyio.Event) -> None:
        while True:
            lease_s = self.policy().orchestration.claim_lease_s
            await anyio.sleep(lease_s / 3)
            try:
                mine = await self._change(claim.key, lambda board, now: _pair(renewed(
                    board, claim.entry_id, self.member, claim.claim, now, lease_s)))
            except _NATS_ERRORS as exc:
                self.stats.errors += 1
                log.warning("task %s: renewing the claim on %s failed (%r); trying again", claim.board.task.task_id,
                            claim.entry_id, exc)
                continue
            if not mine:
                lost.set()
                return
            self.stats.renewals += 1

    async def _release(self, claim: Claim) -> None:
        """Stopping: let the claim lapse now, so another member takes it over without waiting for its lease."""
        try:
            await self._change(claim.key, lambda board, now: _pair(released(
                board, claim.entry_id, self.member, claim.claim, now)))
        except _NATS_ERRORS:
            pass  # it lapses at its lease's end

    async def _cover(self, claim: Claim) -> int | Failure:
        """Make the task's reservation cover the claimed part (the board as claimed counts its estimate among
        what the parts may use): ask the budget for the shortfall. What it reserved, or why not."""
        board = claim.board
        need = shortfall(reserved(board), committed(board), 0)
        if self.reserve is None or need == 0:
            return 0
        task = board.task
        reply = await self.reserve(ExtendReservation(tenant=task.tenant, user=task.user, task_id=task.task_id,
                                                     part=claim.entry_id, tokens=need))
        if not reply.granted:
            return Failure(reason="over_budget", error=f"over budget: {claim.entry_id} needs {need:,} tokens more "
                                                       f"than the task reserved; {reply.message}")
        return reply.tokens

    async def _work(self, claim: Claim, lost: anyio.Event) -> Answer | Failure | None:
        """The entry down its agent's chain; None if the claim was lost before the chain ended."""
        board, entry = claim.board, entry_of(claim.board, claim.entry_id)
        assert entry is not None
        policy = self.policy()
        agent = policy.agents.get(entry.spec.agent)
        if agent is None:
            return Failure(reason="permanent_error", error=f"agent kind {entry.spec.agent!r} is not in the policy")
        reviewed = policy.approvals_for(board.task.tenant).step_rule(
            entry.spec.agent, board.task.estimate.total, entry.spec.requires_approval)
        if reviewed is not None:  # as a gated call: a pool cannot hold a claim while a person decides
            return Failure(reason="permanent_error", error=f"{claim.entry_id} needs approval before it starts "
                           f"({reviewed[1]}): distributed and hybrid tasks cannot wait for one (run it centralized)")
        attempts: list[Attempt] = []
        spent: list[Usage | None] = []
        steps = 0

        def used() -> Usage | None:
            total = Usage.sum(spent)
            return total if total.total else None

        for index, strategy in enumerate(agent.chain):
            if strategy.kind == "cache":
                continue  # the answer cache is the executor's: a pool has no cached answer to give
            for attempt in range(1, strategy.max_attempts + 1):
                if lost.is_set() or (steps and not await self._still_mine(claim)):
                    return None  # no other step for a claim that is no longer this member's
                now = self.clock()
                if 0 < board.deadline_at <= now:
                    return Failure(reason="deadline_exceeded", attempts=attempts, spent=used(),
                                   error=f"the task's deadline passed before {claim.entry_id} had an answer")
                outcome = await self._step(step_request(board, claim.entry_id, claim.claim, index, strategy, attempt,
                                                        policy, now))
                steps += 1
                if isinstance(outcome, StepCompleted) and outcome.gated is not None:
                    # a pool cannot hold a claim while a person decides: the high-stakes call is not made
                    spent.append(outcome.usage)
                    return Failure(reason="permanent_error", error=f"{claim.entry_id} would call the high-stakes "
                                   f"tool {outcome.gated.call.name!r}, which needs approval: distributed and hybrid "
                                   f"tasks cannot wait for one (run it centralized)",
                                   spent=used())
                if isinstance(outcome, StepCompleted):
                    return Answer(step=outcome, strategy=index, tier=strategy.tier, steps=steps, spent=used())
                spent.append(outcome.usage)
                attempts.append(Attempt(step_id=outcome.step_id, dependency=outcome.dependency, error=outcome.error,
                                        message=outcome.message, strategy=index, tier=strategy.tier,
                                        called=not outcome.breaker_open))
                retry, retry_after = policy.retry, outcome.retry_after_s or 0.0
                if (outcome.breaker_open or outcome.error not in RETRYABLE or attempt >= strategy.max_attempts
                        or retry_after > retry.max_retry_after_s):
                    break
                ceiling = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (attempt - 1))
                wait = max(retry_after, random.uniform(0, ceiling))
                if 0 < board.deadline_at <= self.clock() + wait:
                    break  # waiting would outlast the task: the next strategy now
                with anyio.move_on_after(wait):
                    await lost.wait()
        if not attempts:
            return Failure(reason="permanent_error", error=f"agent {entry.spec.agent!r} has no model strategy")
        last = attempts[-1]
        reason: FailReason = ("breaker_open" if not last.called else
                              "attempts_exhausted" if last.error in RETRYABLE else "permanent_error")
        return Failure(reason=reason, error=f"{last.error}: {last.message}", attempts=attempts, spent=used())

    async def _still_mine(self, claim: Claim) -> bool:
        """The claim is still this member's, as the bucket says now (if it can say)."""
        try:
            board, _ = await self.boards.read(claim.key)
        except _NATS_ERRORS:
            return True  # the renewals will tell
        return board is not None and holds(board, claim.entry_id, self.member, claim.claim)

    async def _step(self, step: StepRequested) -> StepCompleted | StepFailed:
        try:
            return await self.run_step(step)
        except _NATS_ERRORS as exc:  # the step's outcome could not be published: counted as a transient failure
            self.stats.errors += 1
            return StepFailed(task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id,
                              attempt=step.attempt, agent=step.agent,
                              dependency=dependency_key(step.provider, step.model), error="transient",
                              message=clip(f"the step's outcome was not published: {exc!r}"))

    async def _post(self, claim: Claim, outcome: Answer | Failure, extended: int = 0) -> None:
        """The result on the board, if the claim is still this member's; then the task's end, if it ended it."""
        def decide(board: Board, now: float) -> tuple[Board, TaskCompleted | TaskFailed | None] | None:
            if not holds(board, claim.entry_id, self.member, claim.claim):
                return None
            return answered(board, claim.entry_id, outcome, now, extended)

        written = await self._change(claim.key, decide)
        task = claim.board.task
        if written is None:
            self.stats.abandoned += 1
            log.info("task %s: %s's claim %d on %s was taken over or its board ended: result refused", task.task_id,
                     self.member, claim.claim, claim.entry_id)
            return
        if isinstance(outcome, Answer):
            self.stats.completed += 1
        else:
            self.stats.failed += 1
            log.warning("task %s: %s failed: %s", task.task_id, claim.entry_id, outcome.error)
        board, end = written
        if end is not None:
            await self._publish_end(end)
        step = outcome.step.step_id if isinstance(outcome, Answer) else \
            outcome.attempts[-1].step_id if outcome.attempts else ""
        try:
            await self.notify(subjects.task_progress(task.tenant, task.task_id), TaskProgress(
                task_id=task.task_id, tenant=task.tenant, user=task.user, stage="plan", worker=self.member,
                step_id=step, message=line(board), parts=parts(board)))
        except _NATS_ERRORS as exc:  # news only
            log.debug("task %s: progress not published: %r", task.task_id, exc)

    async def _publish_end(self, end: TaskCompleted | TaskFailed) -> None:
        if isinstance(end, TaskCompleted):
            self.stats.tasks_completed += 1
            await _surely(self.emit, subjects.task_completed(end.tenant), end)
        else:
            self.stats.tasks_failed += 1
            await _surely(self.emit, subjects.task_failed(end.tenant), end)


def _part_span(claim: Claim):
    """The claimed part's span, in the task's trace (the board carries it), over the steps it runs: named as the
    executor names its own parts, so a trace reads alike in every mode."""
    board, entry = claim.board, entry_of(claim.board, claim.entry_id)
    agent = entry.spec.agent if entry else ""
    part = "synthesis" if claim.entry_id == SYNTHESIS_ID else claim.entry_id
    return tracing.consuming(f"{'synthesis' if part == 'synthesis' else 'subtask ' + part} {agent}", board.trace, {
        "corral.task_id": board.task.task_id, "corral.part": part, "gen_ai.agent.name": agent,
        "corral.claim": str(claim.claim)})


def _pair(board: Board | None) -> tuple[Board, None] | None:
    return None if board is None else (board, None)
