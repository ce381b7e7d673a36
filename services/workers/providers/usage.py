"""A call's usage: what the server reported, and tiktoken's count of what it did not."""

from __future__ import annotations

import msgspec

from contracts.events import Usage
from services.workers.conversation import ModelRequest, ToolCall
from services.workers.providers.http import tokens
from shared.tokens import count_chat, count_tokens


def usage_of(request: ModelRequest, text: str, tool_calls: list[ToolCall], *, input_tokens: int | None,
             output_tokens: int | None, cached_tokens: int | None = None) -> Usage:
    """The reported counts, within the contract's bounds; a count the server did not report is counted offline
    (the input: the messages with the chat overhead, the tool calls they carry and the tools offered; the
    output: the text and the tool calls), and `estimated` says so."""
    counted_input = tokens(input_tokens) if input_tokens is not None else _input_tokens(request)
    counted_output = tokens(output_tokens) if output_tokens is not None else _output_tokens(request, text, tool_calls)
    return Usage(input_tokens=counted_input, output_tokens=counted_output,
                 cached_tokens=min(tokens(cached_tokens), counted_input),
                 estimated=input_tokens is None or output_tokens is None)


def _input_tokens(request: ModelRequest) -> int:
    prompt = count_chat(request.messages, request.model)
    prompt += sum(_call_tokens(call, request.model) for turn in request.messages for call in turn.tool_calls)
    if request.tools:
        prompt += count_tokens(msgspec.json.encode(request.tools).decode(), request.model)
    return prompt


def _output_tokens(request: ModelRequest, text: str, tool_calls: list[ToolCall]) -> int:
    return count_tokens(text, request.model) + sum(_call_tokens(call, request.model) for call in tool_calls)


def _call_tokens(call: ToolCall, model: str) -> int:
    return count_tokens(call.name, model) + count_tokens(call.arguments, model)
