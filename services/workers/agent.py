"""The agent loop of one step: call the model with the step's tools, run the calls it makes, feed the results
back, until it answers in text or the turns run out.

Defence in depth: the model may call only the tools offered for this step (the task's tools, as the guard
validated them, within the agent's own list). A call to any other tool, or with arguments that are not JSON
valid for the tool's schema, is not made: the model is told why, as the tool's error, and the refusal is
counted. A tool that answers with an error (ToolError) is reported to the model the same way; a tool or
model whose dependency fails (a ProviderError) ends the step with that error class, as the breakers and the
executor's retries expect.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import jsonschema
import msgspec

from contracts import StepRequested, Usage
from contracts.events import clip
from services.workers import gates, telemetry
from services.workers.conversation import Completion, ModelRequest, OnText, Provider, Tool, ToolCall, Turn
from services.workers.errors import PermanentProviderError, ToolError

log = logging.getLogger(__name__)
T = TypeVar("T")
Call = Callable[[str, Callable[[], Awaitable[T]]], Awaitable[T]]
"""Makes a call to a dependency through its breaker, recording it (StepRun.call)."""
_decode_arguments = msgspec.json.Decoder(dict[str, Any]).decode


class MaxTurnsReached(PermanentProviderError):
    """The model kept calling tools for all the turns the agent's policy allows."""


class Answer(msgspec.Struct, kw_only=True):
    text: str
    usage: Usage
    turns: int
    refused_tool_calls: int
    response_model: str
    first_token_s: float | None


def conversation(step: StepRequested, system_prompt: str) -> list[Turn]:
    """The step's messages as the model sees them: the agent's system prompt first, when it has one."""
    messages = step.messages or []
    turns = [Turn(role=m.role, content=m.content, name=m.name or "") for m in messages] or [
        Turn(role="user", content=step.prompt)]
    return [Turn(role="system", content=system_prompt), *turns] if system_prompt else turns


class AgentLoop:
    def __init__(self, step: StepRequested, provider: Provider, tools: dict[str, Tool], call: Call, *,
                 model_dependency: str, max_turns: int, max_tool_output_chars: int, system_prompt: str = "",
                 on_text: OnText | None = None, trace_content: bool = False,
                 approved_calls: gates.ApprovedCalls | None = None) -> None:
        self.step = step
        self.provider = provider
        self.tools = tools
        """What this step may call, by the name the model knows."""
        self.call = call
        self.model_dependency = model_dependency
        self.max_turns = max_turns
        self.max_tool_output_chars = max_tool_output_chars
        self.messages = conversation(step, system_prompt)
        self.on_text = on_text
        self.trace_content = trace_content
        self.usage = Usage(input_tokens=0, output_tokens=0)
        self.refused = 0
        self.first_token_s: float | None = None
        self.gated = set(step.gated_tools)
        """Tools not to call without approval (services/workers/gates.py)."""
        self.approved_calls = approved_calls
        """Makes a resumed step's approved call at most once over every worker (None: this loop alone)."""

    async def run(self) -> Answer:
        if self.step.resume is not None:  # on from an approved gate: its call first, without asking the model
            self.messages, calls = gates.resumed(self.step.resume)
            await self._make_calls(calls, turns=0, approved=self.step.resume.call.id)
        for turn in range(1, self.max_turns + 1):
            completion = await self._ask()
            if not completion.tool_calls:
                return Answer(text=completion.text, usage=self.usage, turns=turn, refused_tool_calls=self.refused,
                              response_model=completion.response_model, first_token_s=self.first_token_s)
            self.messages.append(Turn(role="assistant", content=completion.text, tool_calls=completion.tool_calls))
            await self._make_calls(completion.tool_calls, turns=turn)
        raise MaxTurnsReached(f"the model was still calling tools after max_turns={self.max_turns} turns "
                              f"(the agent policy's limit): no answer")

    async def _make_calls(self, calls: list[ToolCall], *, turns: int, approved: str = "") -> None:
        """Make the calls in order; stop before one to a gated tool, unless it is the `approved` call."""
        for n, tool_call in enumerate(calls):
            if tool_call.name in self.gated and tool_call.id != approved:
                raise gates.stop_before(tool_call, self.messages, calls[n + 1:], self.usage, turns)
            if approved and tool_call.id == approved and self.approved_calls is not None:
                self.messages.append(await self.approved_calls.once(self.step, lambda: self._tool_turn(tool_call)))
                continue
            self.messages.append(await self._tool_turn(tool_call))

    async def _ask(self) -> Completion:
        request = ModelRequest(model=self.step.model, messages=list(self.messages), max_tokens=self.step.max_tokens,
                               tools=[tool.spec for tool in self.tools.values()], call_id=self.step.step_id,
                               attempt=self.step.attempt)
        with telemetry.chat_span(self.provider.system, request, self.trace_content) as span:
            try:
                completion = await self.call(self.model_dependency,
                                             lambda: self.provider.complete(request, self.on_text))
            except Exception as error:
                telemetry.failed(span, getattr(error, "error_class", type(error).__name__))
                raise
            telemetry.answered(span, completion, self.trace_content)
        self.usage = Usage.sum([self.usage, completion.usage])
        if self.first_token_s is None and completion.first_token_s is not None:
            self.first_token_s = completion.first_token_s
        return completion

    async def _tool_turn(self, tool_call: ToolCall) -> Turn:
        with telemetry.tool_span(tool_call, self.provider.system, self.trace_content) as span:
            refusal, tool, arguments = self._check(tool_call)
            if refusal:
                self.refused += 1
                log.warning("step %s: refused the model's call of %r: %s", self.step.step_id, tool_call.name, refusal)
                telemetry.failed(span, "tool_call_refused")
                return self._result(tool_call, f"refused: {refusal}", is_error=True)
            try:
                result = await self.call(tool.dependency, lambda: tool.run(arguments))
            except ToolError as error:
                telemetry.failed(span, "tool_error")
                return self._result(tool_call, f"error: {error}", is_error=True)
            except Exception as error:
                telemetry.failed(span, getattr(error, "error_class", type(error).__name__))
                raise
            telemetry.tool_answered(span, result, self.trace_content)
            return self._result(tool_call, result)

    def _check(self, tool_call: ToolCall) -> tuple[str, Tool | None, dict[str, Any]]:
        """Why this call must not be made (empty: it may), the tool and its arguments."""
        tool = self.tools.get(tool_call.name)
        if tool is None:
            offered = ", ".join(sorted(self.tools)) or "none"
            return f"tool {tool_call.name!r} is not available to this task (available: {offered})", None, {}
        try:
            arguments = _decode_arguments(tool_call.arguments or "{}")
        except (msgspec.DecodeError, RecursionError) as error:
            return f"the arguments are not a JSON object: {error}", tool, {}
        try:
            jsonschema.validate(arguments, tool.spec.parameters)
        except jsonschema.ValidationError as error:
            return f"the arguments do not match the tool's schema: {error.message}", tool, {}
        except jsonschema.SchemaError as error:
            return f"the tool's schema is invalid: {error.message}", tool, {}
        return "", tool, arguments

    def _result(self, tool_call: ToolCall, text: str, *, is_error: bool = False) -> Turn:
        return Turn(role="tool", tool_call_id=tool_call.id, name=tool_call.name, is_error=is_error,
                    content=clip(text, self.max_tool_output_chars))
