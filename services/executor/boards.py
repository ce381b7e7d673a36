"""The executor's part in distributed and hybrid tasks: it writes each task's board once, and in hybrid mode
it supervises what the pools claim.

Distributed: the board is the whole coordination; the pools claim, answer and end the task
(services/workers/board.py). The executor only writes it, and once the board has ended notes that in
its own record, so `corral status` tells it.

Hybrid: the pools claim subtasks as in distributed mode, and every executor replica watches the board.
A ready subtask no pool claims within `handoff_timeout_s` is handed to the policy's fallback agent (its
entry's agent rewritten); once every subtask has ended, the executor runs the synthesis as its own step
(claiming the synthesis entry first, so one replica does); and a task past its deadline fails. Each of
those is one compare-and-set on the board that only one replica wins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import msgspec

from contracts import TaskFailed, subjects
from contracts.boards import SYNTHESIS_ID, Board, Entry
from contracts.events import Plan, Subtask, TaskAdmitted, Usage, clip
from contracts.policy import Policy
from shared.kv import TypedBucket

log = logging.getLogger(__name__)
SUPERVISE_EVERY_S = 0.1
ENDED = ("completed", "failed")
Emit = Callable[[str, object], Awaitable[None]]
StartSynthesis = Callable[[Board], Awaitable[None]]
NoteEnd = Callable[[Board], Awaitable[None]]


def new_board(task: TaskAdmitted, plan: Plan, now: float, deadline_at: float,
              trace: dict[str, str] | None = None, planning_usage: Usage | None = None,
              planning_steps: int = 0) -> Board:
    synthesis = Subtask(id=SYNTHESIS_ID, agent=plan.synthesis or task.spec.agent,
                        instruction="Put the results together into one answer.")
    return Board(task=task, mode=task.spec.orchestration, on_failure=plan.on_failure,
                 entries=[Entry(spec=sub) for sub in plan.subtasks], synthesis=Entry(spec=synthesis), created_at=now,
                 updated_at=now, deadline_at=deadline_at, trace=trace or {}, planning_usage=planning_usage,
                 planning_steps=planning_steps)


def ready(board: Board) -> list[Entry]:
    """Waiting entries whose needs have ended well (or at all, under best_effort)."""
    status = {entry.spec.id: entry.status for entry in board.entries}
    best_effort = board.on_failure == "best_effort"
    return [entry for entry in board.entries if entry.status == "waiting" and all(
        status[n] == "completed" or (best_effort and status[n] in ENDED) for n in entry.spec.needs)]


def settled(board: Board) -> bool:
    """No entry runs and none can start: time for the synthesis."""
    return not any(entry.status == "claimed" for entry in board.entries) and not ready(board)


class BoardSupervisor:
    """Every hybrid board's supervisor in this executor replica (all replicas supervise; the board's
    compare-and-set lets one act)."""

    def __init__(self, boards: TypedBucket[Board], policy: Callable[[], Policy], emit: Emit,
                 start_synthesis: StartSynthesis, note_end: NoteEnd | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.boards = boards
        self.note_end = note_end
        self.ended: dict[str, Board] = {}
        """Distributed boards that ended, whose end the executor's record does not show yet."""
        self.policy = policy
        self.emit = emit
        self.start_synthesis = start_synthesis
        self.clock = clock
        self.watched: dict[str, Board] = {}
        """Hybrid boards not ended, by key, as the bucket's watch last told them."""
        self.handed_over = 0

    def apply(self, key: str, value: bytes | None, revision: int = 0) -> None:
        board = msgspec.json.decode(value, type=Board) if value is not None else None
        if board is not None and board.mode == "distributed" and board.ended and self.note_end is not None:
            self.ended[key] = board
        if board is None or board.mode != "hybrid" or board.ended:
            self.watched.pop(key, None)
        else:
            self.watched[key] = board

    async def run(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            for key, board in list(self.ended.items()):
                try:
                    await self.note_end(board)
                    self.ended.pop(key, None)
                except Exception:  # logged; noted on the next round
                    log.exception("noting the end of board %s failed; retrying", key)
            for key in list(self.watched):
                try:
                    await self.supervise(key)
                except Exception:  # logged; looked at again on the next round
                    log.exception("supervising board %s failed; retrying", key)
            with anyio.move_on_after(SUPERVISE_EVERY_S):
                await stop.wait()

    async def supervise(self, key: str) -> None:
        board, revision = await self.boards.read(key)
        if board is None or board.ended:
            self.watched.pop(key, None)
            return
        now, limits = self.clock(), self.policy().orchestration
        if now >= board.deadline_at:
            await self._fail(key, board, revision, "deadline_exceeded",
                             f"deadline passed with the board at: {_summary(board)}")
            return
        if board.synthesis.status == "waiting" and settled(board):
            await self._synthesise(key, board, revision, now)
            return
        stale = [entry for entry in ready(board) if not entry.handed_over and now - board.updated_at >= limits.handoff_timeout_s]
        if stale:
            fallback = limits.fallback_agent or board.task.spec.agent
            for entry in stale:
                entry.spec = msgspec.structs.replace(entry.spec, agent=fallback)
                entry.handed_over = True
            board.updated_at = now
            if await self.boards.write_if(key, board, revision):
                self.handed_over += len(stale)
                log.info("task %s: no pool claimed %s within %g s: handed to %s", board.task.task_id,
                         [e.spec.id for e in stale], limits.handoff_timeout_s, fallback)

    async def _synthesise(self, key: str, board: Board, revision: int, now: float) -> None:
        if not any(entry.status == "completed" for entry in board.entries):
            await self._fail(key, board, revision, "permanent_error", f"no subtask succeeded: {_summary(board)}")
            return
        board.synthesis.status, board.synthesis.claimed_by, board.updated_at = "claimed", "executor", now
        board.synthesis.claims += 1
        if await self.boards.write_if(key, board, revision):  # this replica runs it
            await self.start_synthesis(board)

    async def _fail(self, key: str, board: Board, revision: int, reason, error: str) -> None:
        board.ended, board.updated_at = "failed", self.clock()
        if not await self.boards.write_if(key, board, revision):
            return
        task = board.task
        await self.emit(subjects.task_failed(task.tenant), TaskFailed(
            task_id=task.task_id, tenant=task.tenant, user=task.user, reason=reason, error=clip(error), attempts=[],
            received_at=task.received_at))


def _summary(board: Board) -> str:
    return ", ".join(f"{entry.spec.id} {entry.status}" for entry in board.entries)
