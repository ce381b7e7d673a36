"""The board of a distributed or hybrid task: its plan, written once by the executor, then claimed and
answered, subtask by subtask, by the agent pools; every change a compare-and-set on the task's one key
(`<tenant>.<task_id>`) of the `corral_boards` bucket.

What an observer may see (eventual consistency, on purpose): a subtask `waiting` whose needs have all
completed (no pool has claimed it yet); a claim past its `claim_expires` (its holder died; the next pool
member to look takes it over, and the late holder's result is refused by the compare-and-set); two results
arriving in either order. What it never sees: a subtask completed twice, or the task ended twice — each is
one compare-and-set that only one writer wins.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from contracts.events import (
    MAX_ITEMS,
    Label,
    Message,
    Orchestration,
    OnFailure,
    Subtask,
    TaskAdmitted,
    TaskCompleted,
    TaskFailed,
    Text,
    TokenSum,
    UnixSeconds,
    Usage,
)

EntryStatus = Literal["waiting", "claimed", "completed", "failed"]
SYNTHESIS_ID = "synthesis"
"""The synthesis entry's id (it is the board's `synthesis`, never one of its `entries`). Its steps' ids say
`=synthesis` where a subtask's say its id: `=` is in no subtask id, so the two never meet."""


class Entry(msgspec.Struct, kw_only=True):
    """One subtask on the board (or the synthesis, id SYNTHESIS_ID), and who holds it."""

    spec: Subtask
    status: EntryStatus = "waiting"
    claimed_by: Label = ""
    """The pool member (host-pid) that holds the claim."""
    claim_expires: UnixSeconds = 0.0
    """Unix seconds after which another member may take the claim over (its holder renews it while it works)."""
    claims: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    """Claims taken so far: more than one means a holder died (or let it lapse) and another took over."""
    handed_over: bool = False
    """Hybrid: no pool claimed it in time and the executor gave it to the policy's fallback agent."""
    output: Text = ""
    usage: Usage | None = None
    error: Message = ""
    step_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_=/-]{0,256}$")] = ""
    """The step id its usage was posted under (one per claim)."""
    steps: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    """Steps its claims ran, over every strategy (its usage is the answering one's)."""
    estimate: TokenSum = 0
    """Tokens its claim expects it to use (its prompt and output cap), until its usage is known: what the next
    claimer counts as taken when it works out whether the task's reservation covers its own part."""
    extended: TokenSum = 0
    """Tokens the budget reserved for it beyond the task's reservation (posted with its result)."""


class Board(msgspec.Struct, kw_only=True):
    task: TaskAdmitted
    """The task as it was admitted: who, the request, its estimate."""
    mode: Orchestration
    on_failure: OnFailure
    entries: Annotated[list[Entry], msgspec.Meta(max_length=MAX_ITEMS)]
    synthesis: Entry
    created_at: UnixSeconds
    updated_at: UnixSeconds
    """The last change: a claim, a renewal, a result. A board that does not change for the policy's stall time
    has stalled, and its task fails with what was done."""
    deadline_at: UnixSeconds
    ended: Literal["", "completed", "failed"] = ""
    """Set by the one writer that ends the task (the synthesis's holder, or whoever fails it)."""
    planning_usage: Usage | None = None
    """The manager's, when it made the plan: part of the task's usage."""
    planning_steps: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    """The manager's steps (0: the publisher sent the plan): part of the task's attempts."""
    outcome: TaskCompleted | TaskFailed | None = None
    """The task's end, written in the write that ended the board: its writer publishes it, and the executor,
    seeing the board end, publishes it again (the stream stores it once), so a writer that dies in between
    loses nothing."""
    trace: Annotated[dict[Annotated[str, msgspec.Meta(max_length=32)], Annotated[str, msgspec.Meta(max_length=512)]],
                     msgspec.Meta(max_length=4)] = {}
    """The task's trace context (W3C `traceparent`, `tracestate`) where the executor wrote the board: each pool
    member's work on a part joins the task's trace under it (one trace per task, in every mode)."""


ENDED_BOARD_TTL_S = 24 * 3600.0
"""An ended board is kept this long after its end (for whoever looks at it), then expires."""


def ended_board_ttl(board: Board) -> float | None:
    """The time to live of a board's write, whoever writes it: none while it runs."""
    return ENDED_BOARD_TTL_S if board.ended else None
