"""Orchestrated tasks: a plan of subtasks, run by specialist agents in parallel as their inputs are ready, then
put together by a synthesis step; coordinated by the executor (`centralized`), on a real nats-server."""

from __future__ import annotations

import os
import sys

import anyio
import msgspec
import pytest
from rich.console import Console

from contracts import StepCompleted, StepRequested, TaskCompleted, TaskFailed, TaskProgress, TaskRejected, TaskSpec
from contracts.events import PartState, Plan, Subtask
from contracts.policy import OrchestrationLimits
from shared.plans import depth as plan_depth
from services.cli.tasks import ProgressPrinter
from tests.conftest import operator_env, stack, wait_until
from tests.signals import example_policy, signals

pytestmark = [pytest.mark.anyio]
PARTS = [Subtask(id="facts", agent="research", instruction="Gather the facts."),
         Subtask(id="code", agent="coding", instruction="Write the migration script."),
         Subtask(id="notes", agent="writing", instruction="Draft the release notes.")]


def planned(subtasks: list[Subtask], **plan) -> TaskSpec:
    return TaskSpec(agent="writing", prompt="Ship the migration.", orchestration="centralized",
                    plan=Plan(subtasks=subtasks, **plan))


def test_a_plans_depth_is_its_longest_chain_of_needs_and_a_circle_or_a_missing_need_is_no_dag():
    chain = [Subtask(id="a", agent="r", instruction="i"), Subtask(id="b", agent="r", instruction="i", needs=["a"]),
             Subtask(id="c", agent="r", instruction="i", needs=["b", "a"])]
    assert plan_depth(Plan(subtasks=chain)) == 3
    assert plan_depth(Plan(subtasks=PARTS)) == 1
    circle = [Subtask(id="a", agent="r", instruction="i", needs=["b"]),
              Subtask(id="b", agent="r", instruction="i", needs=["a"])]
    for bad, words in ((circle, "needs itself"), ([Subtask(id="a", agent="r", instruction="i", needs=["z"])],
                                                   "not in the plan"), ([PARTS[0], PARTS[0]], "used twice")):
        with pytest.raises(ValueError, match=words):
            plan_depth(Plan(subtasks=bad))


def test_a_thousand_subtasks_deep_plan_is_measured_without_recursing():
    deep = [Subtask(id=f"s{n}", agent="r", instruction="i", needs=[f"s{n - 1}"] if n else []) for n in range(1000)]
    assert plan_depth(Plan(subtasks=deep)) == 1000


@pytest.mark.integration
async def test_three_specialists_work_in_parallel_and_a_synthesis_puts_their_results_together(
        settings, tenant, user):
    # Each model call takes 1 s: all three parts are asked for before any can have answered.
    async with stack(settings.with_changes(sim_latency_s=1.0), policy=example_policy()) as client, \
            signals(client) as heard:
        boards: list[str] = []
        end = await client.run(planned(PARTS), tenant=tenant, user=user,
                               on_progress=lambda p: boards.append(p.message) if p.stage == "plan" else None)
        requested = heard.of(StepRequested, task_id=end.task_id)
        completed = heard.of(StepCompleted, task_id=end.task_id)
    assert isinstance(end, TaskCompleted), end
    parts = {r.subtask: r for r in requested if r.subtask}
    assert {sub: r.agent for sub, r in parts.items()} == {"facts": "research", "code": "coding", "notes": "writing"}
    (synthesis,) = [r for r in requested if not r.subtask]
    assert synthesis.agent == "writing"
    last_part = max(c.occurred_at for c in completed if c.step_id != synthesis.step_id)
    assert synthesis.occurred_at >= last_part  # after every part answered
    first_done = min(c.occurred_at for c in completed)
    assert all(r.occurred_at <= first_done for r in parts.values())  # all three started before any answered
    outputs = {c.step_id: c.output for c in completed}
    for sub, request in parts.items():
        assert f"Result of {sub}" in synthesis.prompt and outputs[request.step_id] in synthesis.prompt
    assert end.output == outputs[synthesis.step_id]
    assert end.usage.output_tokens == sum(c.usage.output_tokens for c in completed)  # every step's, once
    assert boards[0].startswith("subtasks: facts running, code running, notes running")
    assert "facts completed, code completed, notes completed; synthesis running" in boards[-1]


@pytest.mark.integration
async def test_a_subtask_runs_once_what_it_needs_has_answered_and_is_given_its_output(settings, tenant, user):
    chain = [Subtask(id="facts", agent="research", instruction="Gather the facts."),
             Subtask(id="code", agent="coding", instruction="Write the script from the facts.", needs=["facts"])]
    async with stack(settings, policy=example_policy()) as client, signals(client) as heard:
        end = await client.run(planned(chain), tenant=tenant, user=user)
        requested = {r.subtask: r for r in heard.of(StepRequested, task_id=end.task_id)}
        facts = next(c for c in heard.of(StepCompleted, task_id=end.task_id) if c.step_id == requested["facts"].step_id)
    assert isinstance(end, TaskCompleted), end
    assert requested["code"].occurred_at >= facts.occurred_at
    assert f"Result of facts (research):\n{facts.output}" in requested["code"].prompt


@pytest.mark.integration
async def test_one_subtask_at_a_time_when_the_policy_allows_one_in_parallel(settings, tenant, user):
    policy = msgspec.structs.replace(example_policy(), orchestration=OrchestrationLimits(max_parallel=1))
    async with stack(settings, policy=policy) as client, signals(client) as heard:
        end = await client.run(planned(PARTS), tenant=tenant, user=user)
        requested = [r for r in heard.of(StepRequested, task_id=end.task_id) if r.subtask]
        completed = {c.step_id: c for c in heard.of(StepCompleted, task_id=end.task_id)}
    assert isinstance(end, TaskCompleted), end
    ordered = sorted(requested, key=lambda r: r.occurred_at)
    for before, after in zip(ordered, ordered[1:]):
        assert after.occurred_at >= completed[before.step_id].occurred_at


@pytest.mark.integration
@pytest.mark.parametrize("on_failure", ["fail_fast", "best_effort"])
async def test_a_failed_subtask_fails_the_task_or_leaves_the_synthesis_to_say_what_is_missing(
        settings, tenant, user, on_failure):
    broken = Subtask(id="code", agent="coding", instruction="Write it. [sim:fail=permanent]")
    async with stack(settings, policy=example_policy()) as client, signals(client) as heard:
        end = await client.run(planned([PARTS[0], broken], on_failure=on_failure), tenant=tenant, user=user)
        synthesis = [r for r in heard.of(StepRequested, task_id=end.task_id) if not r.subtask]
    if on_failure == "fail_fast":
        assert isinstance(end, TaskFailed) and end.reason == "permanent_error"
        assert end.error.startswith("subtask code failed:") and not synthesis
    else:
        assert isinstance(end, TaskCompleted), end
        assert "Result of code (coding): missing, failed" in synthesis[0].prompt


@pytest.mark.integration
@pytest.mark.parametrize(("spec", "reason", "words"), [
    (TaskSpec(agent="writing", prompt="p", plan=Plan(subtasks=PARTS)), "invalid_request", "orchestration mode"),
    (planned([Subtask(id="a", agent="painter", instruction="i")]), "unknown_agent", "'painter'"),
    (planned([Subtask(id="a", agent="research", instruction="i", needs=["a"])]), "invalid_request", "not a DAG"),
    (planned([Subtask(id=f"s{n}", agent="research", instruction="i") for n in range(17)]), "invalid_request",
     "at most 16"),
    (planned([Subtask(id=f"s{n}", agent="research", instruction="i", needs=[f"s{n - 1}"] if n else [])
              for n in range(5)]), "invalid_request", "5 subtasks deep"),
    (planned([Subtask(id="a", agent="research", instruction="i", tools=["deploy"])]), "tool_forbidden", "'deploy'"),
    (planned([Subtask(id="synthesis", agent="research", instruction="i")]), "invalid_request", "the synthesis's own"),
])
async def test_the_guard_refuses_a_plan_that_is_not_a_dag_within_the_limits_of_known_agents_and_allowed_tools(
        settings, tenant, user, spec, reason, words):
    async with stack(settings, "guard", policy=example_policy()) as client, client.events(ends_only=True) as ends:
        task_id = await client.submit(spec, tenant=tenant, user=user)
        async for end in ends:
            if end.task_id == task_id:
                break
    assert isinstance(end, TaskRejected) and end.reason == reason and words in end.message, end


@pytest.mark.integration
async def test_without_a_plan_the_manager_agent_makes_one_which_is_checked_and_then_run(settings, tenant, user):
    spec = TaskSpec(agent="writing", prompt="Ship the migration.", orchestration="centralized")
    async with stack(settings, policy=example_policy()) as client, signals(client) as heard:
        end = await client.run(spec, tenant=tenant, user=user)
        requested = heard.of(StepRequested, task_id=end.task_id)
    assert isinstance(end, TaskCompleted), end
    planning, *parts, synthesis = sorted(requested, key=lambda r: r.occurred_at)
    assert planning.agent == "writing" and "Reply with the plan only" in planning.prompt
    assert {(r.subtask, r.agent) for r in parts} == {("part1", "coding"), ("part2", "research"), ("part3", "writing")}
    assert synthesis.subtask == "" and "Result of part3 (writing)" in synthesis.prompt


@pytest.mark.integration
@pytest.mark.parametrize("bad_attempts", [1, 2])
async def test_a_managers_plan_that_does_not_validate_is_asked_for_once_more_then_fails_the_task(
        settings, tenant, user, bad_attempts):
    spec = TaskSpec(agent="writing", prompt=f"Ship it. [sim:bad_plan={bad_attempts}]", orchestration="centralized")
    async with stack(settings, policy=example_policy()) as client, signals(client) as heard:
        end = await client.run(spec, tenant=tenant, user=user)
        planning = [r for r in heard.of(StepRequested, task_id=end.task_id) if "Reply with the plan only" in r.prompt]
    assert len(planning) == 2
    assert "Your last plan was refused: the answer holds no JSON object" in planning[1].prompt
    if bad_attempts == 1:
        assert isinstance(end, TaskCompleted), end
    else:
        assert isinstance(end, TaskFailed) and end.reason == "permanent_error"
        assert "the manager's plan did not validate, twice: the answer holds no JSON object" in end.error


@pytest.mark.integration
async def test_corral_cost_of_a_planned_task_rolls_every_part_up_to_the_task(settings, tenant, user):
    import os
    import sys

    import anyio

    from tests.conftest import operator_env

    spec = TaskSpec(agent="writing", prompt="Ship the migration.", orchestration="centralized")
    async with stack(settings, policy=example_policy()) as client:
        end = await client.run(spec, tenant=tenant, user=user)
        done = await anyio.run_process(
            [sys.executable, "-m", "services.cli", "cost", end.task_id, "--nats", settings.nats_url], check=False,
            env={**os.environ, **operator_env(settings), "COLUMNS": "160"})
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    tree = out[out.index("per part of the plan"):]
    for part in ("planning (manager)", "part1", "part2", "part3", "synthesis"):
        assert f"│ {part} " in tree, out
    assert "│ total " in tree and f"{end.usage.total:,}" in tree.splitlines()[-2], out


@pytest.mark.integration
async def test_a_hybrid_task_hands_what_no_pool_claims_to_the_fallback_agent_and_the_executor_synthesises(
        settings, tenant, user):
    from contracts.boards import Board
    from contracts.policy import AgentPolicy, Strategy
    from shared.bus import Bus

    unstaffed = AgentPolicy(chain=[Strategy(provider="simulated", model="sim-small", tier="fast")])
    base = example_policy()
    policy = msgspec.structs.replace(
        base, agents={**base.agents, "translation": unstaffed},  # known to the policy, run by no worker
        orchestration=OrchestrationLimits(handoff_timeout_s=0.5, fallback_agent="writing"))
    parts = [PARTS[0], Subtask(id="french", agent="translation", instruction="Translate the notes.")]
    spec = TaskSpec(agent="writing", prompt="Ship it.", orchestration="hybrid", plan=Plan(subtasks=parts))
    async with stack(settings, policy=policy) as client, signals(client) as heard:
        end = await client.run(spec, tenant=tenant, user=user)
        requested = heard.of(StepRequested, task_id=end.task_id)
        async with Bus.connect(settings, "test-board") as bus:
            entry = await (await bus.bucket("corral_boards")).get(end.task_ref)
    assert isinstance(end, TaskCompleted), end
    board = msgspec.json.decode(entry.value, type=Board)
    french = next(e for e in board.entries if e.spec.id == "french")
    assert french.handed_over and french.spec.agent == "writing" and french.status == "completed"
    assert board.ended == "completed" and board.synthesis.claimed_by == "executor"
    (synthesis,) = [r for r in requested if "Put these results together" in r.prompt]
    assert synthesis.agent == "writing" and french.output in synthesis.prompt


@pytest.mark.integration
async def test_a_distributed_task_is_claimed_and_answered_by_the_pools_and_ended_by_the_synthesis_holder(
        settings, tenant, user):
    spec = TaskSpec(agent="writing", prompt="Ship it.", orchestration="distributed", plan=Plan(subtasks=PARTS))
    async with stack(settings, policy=example_policy()) as client, signals(client) as heard:
        end = await client.run(spec, tenant=tenant, user=user)
        completed = heard.of(StepCompleted, task_id=end.task_id)

        async def recorded():  # the executor notes the board's end in its own record
            return (await client.task_status(end.task_id, tenant=tenant)).status == "completed"

        await wait_until(recorded)
        status = await client.task_status(end.task_id, tenant=tenant)
    assert isinstance(end, TaskCompleted), end
    assert status.usage.total == end.usage.total
    assert len(completed) == 4  # three parts and the synthesis, each once
    assert end.usage.output_tokens == sum(c.usage.output_tokens for c in completed)


def progress_of(parts: list[tuple[str, str]], stage: str = "plan", **fields) -> TaskProgress:
    return TaskProgress(task_id="t1", tenant="default", user="u", stage=stage, message="", **fields,
                        parts=[PartState(id=id_, agent="research", status=status) for id_, status in parts])


@pytest.mark.parametrize("terminal", [False, True])
def test_submit_follow_shows_a_plans_parts_as_a_tree_that_follows_their_states(terminal):
    out = Console(record=True, force_terminal=terminal, width=100)
    printer = ProgressPrinter(out)
    printer(progress_of([("facts", "running"), ("code", "waiting"), ("synthesis", "waiting")]))
    printer(progress_of([("facts", "running"), ("code", "waiting"), ("synthesis", "waiting")]))  # no change
    printer(progress_of([("facts", "completed"), ("code", "failed"), ("synthesis", "running")]))
    printer.close()
    text = out.export_text()
    assert "plan of t1" in text
    final = text[text.rindex("plan of t1"):]
    assert [line.split()[1:3] for line in final.splitlines()[1:4]] == [["done", "facts"], ["failed", "code"],
                                                                        ["running", "synthesis"]]
    if not terminal:  # a pipe gets the tree once per change: twice, not three times
        assert text.count("plan of t1") == 2 and "planned   code" in text


@pytest.mark.integration
async def test_corral_submit_follow_ends_with_every_part_of_the_plan_done(settings, tenant, user, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_bytes(msgspec.json.encode(Plan(subtasks=PARTS)))
    async with stack(settings, policy=example_policy()):
        done = await anyio.run_process(
            [sys.executable, "-m", "services.cli", "submit", "Ship the migration.", "--agent", "writing",
             "--orchestration", "centralized", "--plan", str(plan), "--user", user, "--nats", settings.nats_url],
            check=False, env={**os.environ, **operator_env(settings), "COLUMNS": "160"})
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    final = out[out.rindex("plan of "):]
    states = {line.split()[2]: line.split()[1] for line in final.splitlines()[1:5]}
    assert states == {"facts": "done", "code": "done", "notes": "done", "synthesis": "done"}
    assert "completed" in final  # the task's end, after the tree


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["centralized", "distributed", "hybrid"])
async def test_a_manager_planned_tasks_usage_and_attempts_count_every_step_the_planning_included(
        settings, tenant, user, mode):
    spec = TaskSpec(agent="writing", prompt="Ship the migration.", orchestration=mode)
    async with stack(settings, policy=example_policy()) as client, signals(client) as heard:
        end = await client.run(spec, tenant=tenant, user=user)
        steps = heard.of(StepCompleted, task_id=end.task_id)
    assert isinstance(end, TaskCompleted), end
    assert len(steps) == 5  # the plan, three parts, the synthesis
    assert end.usage.total == sum(step.usage.total for step in steps)
    assert end.attempts == len(steps)
