"""The approval rules that need no server: how a refused call reaches the model, and the policy's checks."""

from __future__ import annotations

import pytest

from contracts.approvals import AgentTurn, Resume, ToolCallSpec
from services.workers import gates


def resume(refused: str = "") -> Resume:
    return Resume(approval_id="a1", call=ToolCallSpec(id="call-1", name="http_get", arguments='{"url":"x"}'),
                  turns=[AgentTurn(role="user", content="pay")], after=[ToolCallSpec(id="call-2", name="search")],
                  refused=refused)


def test_a_refused_call_is_not_made_and_the_model_reads_the_refusal_as_its_result():
    turns, calls = gates.resumed(resume(refused="approval a1 was denied by bob: not this quarter"))
    assert [call.id for call in calls] == ["call-2"]  # the calls after it only
    last = turns[-1]
    assert (last.role, last.tool_call_id, last.name, last.is_error) == ("tool", "call-1", "http_get", True)
    assert last.content == "refused: approval a1 was denied by bob: not this quarter"


def test_an_approved_call_is_made_first_then_the_calls_after_it():
    turns, calls = gates.resumed(resume())
    assert [call.id for call in calls] == ["call-1", "call-2"] and [t.role for t in turns] == ["user"]


def test_the_cost_so_far_prices_each_part_at_its_own_models_price_and_counts_its_gated_steps():
    from contracts import TaskAdmitted, TaskSpec, TokenEstimate, Usage
    from contracts.events import Subtask
    from contracts.policy import Policy, Strategy
    from services.executor.approvals import cost_so_far
    from services.executor.state import Gates, SubtaskState, TaskRecord

    def on(model: str) -> list[Strategy]:
        return [Strategy(provider="simulated", model=model)]

    task = TaskAdmitted(task_id="t1", tenant="acme", user="u", spec=TaskSpec(agent="research"),
                        estimate=TokenEstimate(prompt_tokens=10, max_output_tokens=10), reserved_tokens=20, window="")
    answered = SubtaskState(spec=Subtask(id="a", agent="research", instruction="a"), status="completed",
                            chain=on("sim-large"), usage=Usage(input_tokens=1000, output_tokens=100))
    at_a_gate = SubtaskState(spec=Subtask(id="b", agent="research", instruction="b"), status="running",
                             chain=on("sim-small"), gates=Gates(usage=Usage(input_tokens=2000, output_tokens=0)))
    record = TaskRecord(task=task, chain=on("sim-large"), planning_usage=Usage(input_tokens=0, output_tokens=100),
                        subtasks=[answered, at_a_gate])
    policy = Policy()
    usage, cost = cost_so_far(policy, record)
    large, small = policy.price_of("sim-large"), policy.price_of("sim-small")
    assert usage.total == 1000 + 100 + 2000 + 100
    assert cost == pytest.approx(large.cost(Usage(input_tokens=1000, output_tokens=200)) + small.cost(
        Usage(input_tokens=2000, output_tokens=0)))


def test_a_negative_cost_above_usd_is_refused_with_its_name():
    from contracts.policy import ApprovalRules

    with pytest.raises(ValueError, match="cost_above_usd"):
        ApprovalRules(cost_above_usd=-1.0)


def test_a_hybrid_boards_part_whose_model_the_record_does_not_know_is_priced_at_its_agents_first_model():
    from contracts import TaskAdmitted, TaskSpec, TokenEstimate, Usage
    from contracts.events import Subtask
    from services.executor.approvals import cost_so_far
    from services.executor.state import SubtaskState, TaskRecord
    from tests.signals import example_policy

    policy = example_policy()
    task = TaskAdmitted(task_id="t1", tenant="acme", user="u", spec=TaskSpec(agent="research"),
                        estimate=TokenEstimate(prompt_tokens=10, max_output_tokens=10), reserved_tokens=20, window="")
    used = Usage(input_tokens=1000, output_tokens=100)
    from_board = SubtaskState(spec=Subtask(id="a", agent="research", instruction="a"), status="completed",
                              usage=used)  # as synthesise_board makes it: no chain
    _, cost = cost_so_far(policy, TaskRecord(task=task, subtasks=[from_board]))
    first = policy.agents["research"].chain[0].model
    assert cost == pytest.approx(policy.price_of(first).cost(used)) and cost > 0
