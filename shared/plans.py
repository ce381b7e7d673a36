"""Plans of orchestrated tasks: what makes one valid, and how a manager agent is asked for one and answers.

A plan is a DAG of subtasks (contracts.events.Plan). The guard checks a publisher's plan before the task is
admitted; the executor checks a manager's the same way before it runs. A manager is asked in words that end
with PLAN_REQUEST and answers with the plan as JSON (a model may wrap it in prose or a code fence: the first
`{` to the last `}` is read).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec

from contracts.boards import SYNTHESIS_ID
from contracts.events import Plan, Subtask
from contracts.policy import Policy

PLAN_REQUEST = "Reply with the plan only, as JSON of this shape:"
PLAN_SHAPE = ('{"subtasks": [{"id": "short-id", "agent": "<one of the agents>", "instruction": "what to do", '
              '"needs": ["ids of subtasks whose results it needs"]}]}')
AGENTS_LINE = "Agents: "
_decode = msgspec.json.Decoder(Plan).decode


class PlanInvalid(ValueError):
    """A plan that is not a DAG within the policy's limits, of agents the policy knows and tools the user may
    name; the message says which rule it breaks."""


class UnknownPlanAgent(PlanInvalid):
    pass


class PlanToolForbidden(PlanInvalid):
    pass


def check(plan: Plan, policy: Policy, tenant: str, user: str, synthesis: str) -> None:
    """Raise PlanInvalid (or a subclass) unless `plan` may run for this user."""
    limits = policy.orchestration
    if len(plan.subtasks) > limits.max_subtasks:
        raise PlanInvalid(f"the plan has {len(plan.subtasks)} subtasks; at most {limits.max_subtasks} are allowed")
    for agent in {sub.agent for sub in plan.subtasks} | {plan.synthesis or synthesis}:
        if agent not in policy.agents:
            raise UnknownPlanAgent(f"the plan names agent kind {agent!r}, which is not known; use one of: "
                                   f"{', '.join(sorted(policy.agents))}")
    rules = policy.tools_for(tenant, user)
    for sub in plan.subtasks:
        if sub.id == SYNTHESIS_ID:
            raise PlanInvalid(f"subtask id {SYNTHESIS_ID!r} is the synthesis's own: name the subtask otherwise")
        if sub.max_tokens is not None and sub.max_tokens > policy.limits.max_output_tokens:
            raise PlanInvalid(f"subtask {sub.id!r}: max_tokens must be within 1..{policy.limits.max_output_tokens}")
        for tool in sub.tools:
            if "*" not in rules.allowed and tool not in rules.allowed:
                raise PlanToolForbidden(f"tool {tool!r} is not allowed for {tenant}/{user}; allowed: "
                                        f"{', '.join(rules.allowed) or 'none'}")
    try:
        plan_depth = depth(plan)
    except ValueError as error:
        raise PlanInvalid(f"the plan is not a DAG: {error}") from None
    if plan_depth > limits.max_depth:
        raise PlanInvalid(f"the plan is {plan_depth} subtasks deep; at most {limits.max_depth} are allowed")


def depth(plan: Plan) -> int:
    """Subtasks in the plan's longest chain of `needs`; ValueError when an id repeats, a need names no subtask,
    or the needs go round in a circle."""
    needs = {}
    for sub in plan.subtasks:
        if sub.id in needs:
            raise ValueError(f"subtask id {sub.id!r} is used twice")
        needs[sub.id] = sub.needs
    depths: dict[str, int] = {}
    for start in needs:  # iterative depth-first search: a plan of a thousand subtasks recurses nowhere
        stack, on_path = [(start, iter(needs[start]))], {start}
        while stack:
            node, pending = stack[-1]
            need = next(pending, None)
            if need is None:
                depths[node] = 1 + max((depths[n] for n in needs[node]), default=0)
                on_path.discard(node)
                stack.pop()
            elif need not in needs:
                raise ValueError(f"subtask {node!r} needs {need!r}, which is not in the plan")
            elif need in on_path:
                raise ValueError(f"subtask {need!r} needs itself, through {node!r}")
            elif need not in depths:
                stack.append((need, iter(needs[need])))
                on_path.add(need)
    return max(depths.values())


def request(task_prompt: str, agents: list[str], max_subtasks: int, mistake: str = "") -> str:
    """What a manager agent is asked: split the request among these agents, and answer with the plan."""
    again = f"Your last plan was refused: {mistake}. Make a valid one.\n\n" if mistake else ""
    return (f"{again}You are the manager. Split this request into at most {max_subtasks} subtasks for the agents "
            f"below, as a DAG: a subtask lists in `needs` the subtasks whose results it needs.\n\n"
            f"Request: {task_prompt}\n\n{AGENTS_LINE}{', '.join(agents)}\n\n{PLAN_REQUEST}\n{PLAN_SHAPE}")


def parse(answer: str) -> Plan:
    """The plan in a manager's answer; PlanInvalid when there is none, or it does not fit the contract."""
    start, end = answer.find("{"), answer.rfind("}")
    if start < 0 or end < start:
        raise PlanInvalid("the answer holds no JSON object")
    try:
        return _decode(answer[start:end + 1])
    except (msgspec.DecodeError, RecursionError) as error:
        raise PlanInvalid(f"the answer is not a plan: {error}") from None


# --- what a subtask's agent and the synthesis's are told (the executor's and the pools' alike) ---------------


class Part(Protocol):
    """A subtask as the executor's record or a board keeps it."""

    spec: Subtask
    status: str
    output: str
    error: str


def subtask_prompt(request: str, part: Part, parts: dict[str, Part]) -> str:
    """The subtask's instruction, with the task's request and the outputs of what it needs."""
    lines = [f"Overall request: {request}" if request else "", f"Your part ({part.spec.id}): {part.spec.instruction}"]
    lines += [result_of(parts[need]) for need in part.spec.needs if need in parts]
    return "\n\n".join(line for line in lines if line)


def synthesis_prompt(request: str, parts: Iterable[Part]) -> str:
    """The request and every subtask's result (or why it has none), for the agent that puts them together."""
    return "\n\n".join([f"Request: {request}", "Put these results together into one answer.",
                        *(result_of(part) for part in parts)])


def result_of(part: Part) -> str:
    if part.status == "completed":
        return f"Result of {part.spec.id} ({part.spec.agent}):\n{part.output}"
    why = f": {part.error}" if part.error else ""
    return f"Result of {part.spec.id} ({part.spec.agent}): missing, {part.status}{why}"
