"""Approval gates in the agent loop: stop before a call to a gated tool, and go on from there once approved.

A step whose StepRequested names `gated_tools` never calls one of them unapproved: the loop stops before the
call (Gated), and the step completes with what it held back (StepCompleted.gated: the call, the conversation up
to it, the calls after it in the same model turn), not as a failure. The executor asks a person; once approved
it requests a step with `resume`, which starts from that conversation, makes the approved call (with the
reviewer's arguments when edited), then the calls after it, then asks the model again: the model never repeats
the calls made before the gate, whose results are in the conversation it is given.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from contracts import StepCompleted, StepRequested, Usage
from contracts.approvals import AgentTurn, ApprovedCall, GatedCall, Resume, ToolCallSpec, approval_key
from services.workers.conversation import ToolCall, Turn
from shared.kv import TypedBucket


def bypasses_cache(step: StepRequested) -> bool:
    """A step that may stop at a gate, or resumes from one, is never answered from the response cache nor kept
    in it: a cached answer would skip the approved call, and a gated outcome is no answer to keep."""
    return bool(step.gated_tools) or step.resume is not None


class ApprovedCalls:
    """Makes an approved call at most once over every worker: a note in `corral_approved_calls` before the call
    (KV create: one worker wins), its result in the note after it."""

    def __init__(self, notes: TypedBucket[ApprovedCall], worker: str, clock: Callable[[], float] = time.time) -> None:
        self.notes = notes
        self.worker = worker
        self.clock = clock

    async def once(self, step: StepRequested, make: Callable[[], Awaitable[Turn]]) -> Turn:
        resume = step.resume
        key = approval_key(step.tenant, resume.approval_id)
        mine = ApprovedCall(worker=self.worker, started_at=self.clock())
        note = await self.notes.create(key, mine)
        if note is not mine:  # made, or begun, by another worker (this step's earlier delivery)
            if note.result is not None:
                return _turn(note.result)
            return Turn(role="tool", tool_call_id=resume.call.id, name=resume.call.name, is_error=True,
                        content=f"the approved call's outcome is unknown: worker {note.worker} stopped while making "
                                f"it, and it is not made twice")
        turn = await make()
        mine.result = _agent_turn(turn)
        await self.notes.put(key, mine)
        return turn


class Gated(Exception):
    """The loop stopped before a call that needs approval."""

    def __init__(self, gated: GatedCall, usage: Usage, turns: int) -> None:
        super().__init__(f"tool {gated.call.name!r} needs approval")
        self.gated = gated
        self.usage = usage
        self.turns = turns


def stop_before(tool_call: ToolCall, messages: list[Turn], after: list[ToolCall], usage: Usage,
                turns: int) -> Gated:
    return Gated(GatedCall(call=_spec(tool_call), turns=[_agent_turn(turn) for turn in messages],
                           after=[_spec(call) for call in after],
                           why=f"tool {tool_call.name!r} is high-stakes for this task"), usage, turns)


def resumed(resume: Resume) -> tuple[list[Turn], list[ToolCall]]:
    """The conversation at the gate, and the calls to make first: the approved one, then those after it. A
    refused call is not made: the conversation holds its refusal as its result, and only the calls after it
    remain."""
    turns, after = [_turn(t) for t in resume.turns], [_call(call) for call in resume.after]
    if resume.refused:
        refusal = Turn(role="tool", tool_call_id=resume.call.id, name=resume.call.name, is_error=True,
                       content=f"refused: {resume.refused}")
        return [*turns, refusal], after
    return turns, [_call(resume.call), *after]


def _turn(t: AgentTurn) -> Turn:
    return Turn(role=t.role, content=t.content, name=t.name, tool_call_id=t.tool_call_id, is_error=t.is_error,
                tool_calls=[_call(call) for call in t.tool_calls])


def completed(step: StepRequested, gate: Gated, worker: str, **outcome) -> StepCompleted:
    """The step's outcome at a gate: completed, with no output and the gated call."""
    gated = GatedCall(call=gate.gated.call, rule=gate.gated.rule, why=gate.gated.why, turns=gate.gated.turns,
                      after=gate.gated.after, worker=worker)
    return StepCompleted(task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id,
                         attempt=step.attempt, agent=step.agent, model=step.model, output="", usage=gate.usage,
                         turns=gate.turns, gated=gated, **outcome)


def _spec(call: ToolCall) -> ToolCallSpec:
    return ToolCallSpec(id=call.id, name=call.name, arguments=call.arguments or "{}")


def _call(spec: ToolCallSpec) -> ToolCall:
    return ToolCall(id=spec.id, name=spec.name, arguments=spec.arguments)


def _agent_turn(turn: Turn) -> AgentTurn:
    return AgentTurn(role=turn.role, content=turn.content, name=turn.name, tool_call_id=turn.tool_call_id,
                     is_error=turn.is_error, tool_calls=[_spec(call) for call in turn.tool_calls])
