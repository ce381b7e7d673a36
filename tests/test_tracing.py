"""One trace per task: every service's span arrives at an OTLP collector under one trace id."""

from __future__ import annotations

import os
import sys

import anyio
import pytest

from services.client import Client
from tests.conftest import operator_env, services, wait_until
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
EVERY_SERVICE = {"corral-cli", "corral-guard", "corral-budget", "corral-executor", "corral-worker-research",
                 "corral-breaker", "corral-monitor"}


async def test_a_task_leaves_one_trace_with_a_span_from_every_service(settings, tenant, user, tmp_path):
    with OtlpReceiver() as collector:
        env = {"CORRAL_OTLP_ENDPOINT": collector.endpoint}
        stack = services(settings, tmp_path / "logs", env=env, agents=("research",))
        stack.start()
        try:
            async with Client.connect(settings, "test") as client:
                await client.wait_ready(stack.names(), timeout=90)
            submit = [sys.executable, "-m", "services.cli", "submit", "trace me", "--agent", "research",
                      "--user", user, "--tenant", tenant, "--nats", settings.nats_url]
            done = await anyio.run_process(submit, env={**os.environ, **env, **operator_env(settings)}, check=False)
            assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
            cli_traces = {tid for tid, service, _ in collector.spans if service == "corral-cli"}
            assert len(cli_traces) == 1
            trace_id = cli_traces.pop()

            async def complete():
                return collector.services_in_trace(trace_id) >= EVERY_SERVICE

            await wait_until(complete, timeout=15)
        finally:
            stack.stop()
    spans = [name for tid, _, name in collector.spans if tid == trace_id]
    assert "corral submit" in spans
    assert any(name.startswith("worker-research") for name in spans)



async def test_an_agent_step_is_an_invoke_agent_span_with_genai_chat_and_execute_tool_spans_and_no_content(
        settings, tenant, user, tmp_path):
    from contracts import TaskSpec
    from contracts.policy import AgentPolicy, Strategy
    from tests.conftest import apply
    from tests.test_agents import agents_policy

    simulated = Strategy(provider="simulated", model="sim-small", tier="fast", max_attempts=1)
    await apply(settings, agents_policy({"toolsmith": AgentPolicy(chain=[simulated])}, tools=["calculator"]))
    with OtlpReceiver() as collector:
        stack = services(settings, tmp_path / "logs", env={"CORRAL_OTLP_ENDPOINT": collector.endpoint},
                         agents=("toolsmith",))
        stack.start()
        try:
            async with Client.connect(settings, "test") as client:
                await client.wait_ready(stack.names(), timeout=90)
                done = await client.run(TaskSpec(agent="toolsmith", prompt="6 * 7", tools=["calculator"]),
                                        tenant=tenant, user=user)
                failed = await client.run(TaskSpec(agent="toolsmith", prompt="no [sim:fail=rate_limited]"),
                                          tenant=tenant, user=user)

            async def exported():
                return len(collector.named("invoke_agent")) >= 2 and len(collector.named("chat ")) >= 3

            await wait_until(exported, timeout=15)
        finally:
            stack.stop()
    assert type(done).__name__ == "TaskCompleted" and type(failed).__name__ == "TaskFailed"
    agent_spans = collector.named("invoke_agent toolsmith")
    chats = collector.named("chat sim-small")
    (tool,) = collector.named("execute_tool calculator")
    assert {span[3]["gen_ai.operation.name"] for span in agent_spans} == {"invoke_agent"}
    assert all(span[3]["gen_ai.agent.name"] == "toolsmith" for span in agent_spans)
    answered = [span[3] for span in chats if "gen_ai.usage.output_tokens" in span[3]]
    assert len(answered) == 2 and all(a["gen_ai.operation.name"] == "chat" for a in answered)
    assert all(a["gen_ai.provider.name"] == "simulated" and a["gen_ai.request.model"] == "sim-small" and
               a["gen_ai.response.model"] == "sim-small" and a["gen_ai.usage.input_tokens"] > 0 for a in answered)
    assert sorted(a["gen_ai.response.finish_reasons"][0] for a in answered) == ["stop", "tool_calls"]
    assert [span[3].get("error.type") for span in chats if "gen_ai.usage.output_tokens" not in span[3]] == [
        "rate_limited"]
    assert tool[3]["gen_ai.operation.name"] == "execute_tool" and tool[3]["gen_ai.tool.name"] == "calculator"
    assert len({span[0] for span in [*agent_spans, *chats, tool]}) == 2  # inside the two tasks' traces
    everything = [key for span in collector.detailed for key in span[3]]
    assert not {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.tool.call.arguments"} & set(everything)


@pytest.mark.parametrize("mode", ["centralized", "distributed", "hybrid"])
async def test_a_planned_task_is_one_trace_with_a_span_per_subtask_and_the_synthesis_over_their_steps(
        settings, tenant, user, tmp_path, mode):
    from contracts import TaskSpec
    from contracts.events import Plan, Subtask
    from tests.conftest import apply
    from tests.signals import example_policy

    await apply(settings, example_policy())
    plan = Plan(subtasks=[Subtask(id="facts", agent="research", instruction="Gather."),
                          Subtask(id="notes", agent="writing", instruction="Draft.", needs=["facts"])])
    with OtlpReceiver() as collector:
        stack = services(settings, tmp_path / "logs", env={"CORRAL_OTLP_ENDPOINT": collector.endpoint},
                         agents=("research", "writing"))
        stack.start()
        try:
            async with Client.connect(settings, "test") as client:
                await client.wait_ready(stack.names(), timeout=90)
                done = await client.run(TaskSpec(agent="writing", prompt="Ship it.", orchestration=mode,
                                                 plan=plan), tenant=tenant, user=user)

            async def exported():  # the budget's release of the task comes last
                return len(collector.named("invoke_agent")) >= 3 and collector.named("synthesis writing") \
                    and collector.named("budget budget-release")

            await wait_until(exported, timeout=15)
        finally:
            stack.stop()
    assert type(done).__name__ == "TaskCompleted"
    parts = [*collector.named("subtask facts research"), *collector.named("subtask notes writing"),
             *collector.named("synthesis writing")]
    # Who coordinates each part: the executor (centralized; hybrid's synthesis), else the pool that claimed it.
    coordinators = {"centralized": ["corral-executor"] * 3,
                    "distributed": ["corral-worker-research", "corral-worker-writing", "corral-worker-writing"],
                    "hybrid": ["corral-worker-research", "corral-worker-writing", "corral-executor"]}
    assert [span[1] for span in parts] == coordinators[mode]
    (trace_id,) = {span[0] for span in parts}  # one trace: the task's
    assert len([span for span in collector.named("invoke_agent") if span[0] == trace_id]) == 3  # every step in it
    in_trace = {name for trace, _, name in collector.spans if trace == trace_id}
    assert "budget budget-release" in in_trace  # the task's end too (the budget releases on it), whoever published it
