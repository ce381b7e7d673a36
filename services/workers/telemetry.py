"""Spans of an agent step, with OpenTelemetry's GenAI semantic-convention attributes.

One `invoke_agent` span per step, inside it one `chat` span per model call and one `execute_tool` span per
tool call. What users wrote (prompts, answers, tool arguments and results) goes in only when the
`trace_content` setting says so. When no span is exported each helper does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
from opentelemetry.trace import Span, SpanKind

from contracts import StepRequested
from services.workers.conversation import Completion, ModelRequest, ToolCall
from shared import tracing

OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
AGENT = "gen_ai.agent.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
RESPONSE_MODEL = "gen_ai.response.model"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
CACHED_TOKENS = "gen_ai.usage.cache_read.input_tokens"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"
ERROR_TYPE = "error.type"


@contextmanager
def agent_span(step: StepRequested, system: str) -> Iterator[Span | None]:
    with tracing.span(f"invoke_agent {step.agent}", {
            OPERATION: "invoke_agent", AGENT: step.agent, PROVIDER: system, REQUEST_MODEL: step.model,
            "corral.step_id": step.step_id, "corral.attempt": step.attempt}) as span:
        yield span


@contextmanager
def chat_span(system: str, request: ModelRequest, content: bool) -> Iterator[Span | None]:
    attributes: dict[str, object] = {OPERATION: "chat", PROVIDER: system, REQUEST_MODEL: request.model,
                                     REQUEST_MAX_TOKENS: request.max_tokens}
    if content:
        attributes[INPUT_MESSAGES] = msgspec.json.encode(request.messages).decode()
    with tracing.span(f"chat {request.model}", attributes, kind=SpanKind.CLIENT) as span:
        yield span


def answered(span: Span | None, completion: Completion, content: bool) -> None:
    if span is None:
        return
    span.set_attributes({RESPONSE_MODEL: completion.response_model, INPUT_TOKENS: completion.usage.input_tokens,
                         OUTPUT_TOKENS: completion.usage.output_tokens, CACHED_TOKENS: completion.usage.cached_tokens,
                         FINISH_REASONS: [completion.finish_reason or "unknown"]})
    if content:
        span.set_attribute(OUTPUT_MESSAGES, msgspec.json.encode(
            {"text": completion.text, "tool_calls": completion.tool_calls}).decode())


@contextmanager
def tool_span(call: ToolCall, system: str, content: bool) -> Iterator[Span | None]:
    attributes: dict[str, object] = {OPERATION: "execute_tool", TOOL_NAME: call.name, TOOL_CALL_ID: call.id,
                                     PROVIDER: system}
    if content:
        attributes[TOOL_ARGUMENTS] = call.arguments
    with tracing.span(f"execute_tool {call.name}", attributes) as span:
        yield span


def tool_answered(span: Span | None, result: str, content: bool) -> None:
    if span is not None and content:
        span.set_attribute(TOOL_RESULT, result)


def failed(span: Span | None, error_type: str) -> None:
    """`error_type`: the error class (`transient`, `rate_limited`, …), or why a tool call was refused."""
    if span is not None:
        span.set_attribute(ERROR_TYPE, error_type)
        span.set_status(tracing.error_status(error_type))
