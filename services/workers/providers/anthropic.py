"""Anthropic's Messages API, streamed: Anthropic itself, and the servers that speak it (llama.cpp's
`/v1/messages`, LiteLLM, gateways).

Each call POSTs `{base_url}/messages` with `stream: true`. System turns go top-level (joined); an assistant
turn's tool calls become `tool_use` blocks and tool turns `tool_result` blocks, consecutive ones in one user
message, as the API wants. The stream's events build the answer: `message_start` (model, input usage),
`content_block_start` (a text block, or a tool_use block with its id and name), `content_block_delta` (text,
or a fragment of a tool call's JSON input), `message_delta` (stop reason, output usage) and `message_stop`.

Anthropic counts cached input apart from `input_tokens`; Corral's input_tokens count every input token, so
they are the sum of the three, and cached_tokens the ones read from the cache.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from contracts.events import Usage
from contracts.policy import ProviderConfig
from services.workers.conversation import Completion, ModelRequest, OnText, ToolCall, Turn
from services.workers.errors import TransientProviderError
from services.workers.providers.http import (
    Api,
    ErrorDetail,
    ErrorReport,
    SseEvent,
    class_for_kind,
    report_of,
)
from services.workers.providers.usage import usage_of

SYSTEM = "anthropic"


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Block(msgspec.Struct):
    type: str = ""
    text: str = ""
    id: str = ""
    name: str = ""
    input: dict[str, Any] | None = None


class _Message(msgspec.Struct):
    """`message_start`'s message, or an answer that came whole (a server that did not stream)."""

    model: str = ""
    usage: _Usage | None = None
    content: list[_Block] = []
    stop_reason: str | None = None
    error: ErrorDetail | str | None = None
    """In a whole answer that is an error after all (`{"type": "error", ...}`)."""


class _Delta(msgspec.Struct):
    """`content_block_delta`'s delta (`text_delta`, `input_json_delta`) or `message_delta`'s."""

    type: str = ""
    text: str = ""
    partial_json: str = ""
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    type: str = ""
    message: _Message | None = None
    index: int = 0
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: ErrorDetail | str | None = None


_event = msgspec.json.Decoder(_Event)
_message = msgspec.json.Decoder(_Message)
_KNOWN = {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
          "message_stop", "error", "ping"}


class _PartialCall:
    def __init__(self, block: _Block) -> None:
        self.id = block.id
        self.name = block.name
        self.start_input = block.input
        self.fragments: list[str] = []

    def tool_call(self) -> ToolCall:
        arguments = "".join(self.fragments)
        if not arguments and self.start_input:
            arguments = json.dumps(self.start_input)
        return ToolCall(id=self.id, name=self.name, arguments=arguments or "{}")


class _Answer:
    """One call's answer as it streams in."""

    def __init__(self, request: ModelRequest, on_text: OnText | None, started: float) -> None:
        self.request = request
        self.on_text = on_text
        self.started = started
        self.text: list[str] = []
        self.calls: dict[int, _PartialCall] = {}
        self.usage: dict[str, int] = {}
        self.model = ""
        self.stop_reason = ""
        self.first_token_s: float | None = None

    def on_event(self, event: SseEvent) -> bool:
        if event.name and event.name not in _KNOWN:
            return False  # new event types may come: the API asks clients to ignore them
        try:
            decoded = _event.decode(event.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            what = f"{event.name} event" if event.name else "event"
            raise TransientProviderError(f"a malformed {what}: {error}") from None
        match decoded.type:
            case "message_start" if decoded.message is not None:
                self.model = decoded.message.model or self.model
                self._count(decoded.message.usage)
            case "content_block_start" if decoded.content_block is not None:
                self._block(decoded.index, decoded.content_block)
            case "content_block_delta" if decoded.delta is not None:
                self._delta(decoded.index, decoded.delta)
            case "message_delta":
                if decoded.delta is not None:
                    self.stop_reason = decoded.delta.stop_reason or self.stop_reason
                self._count(decoded.usage)
            case "message_stop":
                return True
            case "error":
                report = report_of(decoded.error) or ErrorReport("no message", "")
                raise class_for_kind(report.kind)(f"an error in the stream: {report.message}")
        return False

    def on_whole(self, body: bytes) -> None:
        try:
            message = _message.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise TransientProviderError(f"a malformed answer: {error}") from None
        if message.error is not None:
            report = report_of(message.error) or ErrorReport("no message", "")
            raise class_for_kind(report.kind)(f"an error: {report.message}")
        self.model = message.model
        self.stop_reason = message.stop_reason or ""
        self._count(message.usage)
        for index, block in enumerate(message.content):
            self._block(index, block)

    def _block(self, index: int, block: _Block) -> None:
        if block.type == "tool_use":
            self._token()
            self.calls[index] = _PartialCall(block)
        elif block.type == "text" and block.text:
            self._text(block.text)

    def _delta(self, index: int, delta: _Delta) -> None:
        if delta.type == "text_delta" and delta.text:
            self._text(delta.text)
        elif delta.type == "input_json_delta" and index in self.calls:
            self._token()
            self.calls[index].fragments.append(delta.partial_json)

    def _text(self, text: str) -> None:
        self._token()
        self.text.append(text)
        if self.on_text is not None:
            self.on_text(text)

    def _token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started

    def _count(self, usage: _Usage | None) -> None:
        """Keep the latest of each count: `message_delta`'s are cumulative, and some servers send the input
        counts only there."""
        if usage is not None:
            self.usage.update({field: value for field in usage.__struct_fields__
                               if (value := getattr(usage, field)) is not None})

    def completion(self) -> Completion:
        text = "".join(self.text)
        calls = [self.calls[index].tool_call() for index in sorted(self.calls)]
        return Completion(text=text, usage=self._usage(text, calls), tool_calls=calls,
                          finish_reason=self.stop_reason, response_model=self.model,
                          first_token_s=self.first_token_s)

    def _usage(self, text: str, calls: list[ToolCall]) -> Usage:
        counts = self.usage
        read, written = counts.get("cache_read_input_tokens", 0), counts.get("cache_creation_input_tokens", 0)
        fresh = counts.get("input_tokens")
        return usage_of(self.request, text, calls, input_tokens=None if fresh is None else fresh + read + written,
                        output_tokens=counts.get("output_tokens"), cached_tokens=read)


class AnthropicProvider:
    """A model API speaking Anthropic's Messages API."""

    system = SYSTEM

    def __init__(self, name: str, config: ProviderConfig, base_url: str) -> None:
        self.name = name
        self.api = Api(name, config, base_url, lambda key: {"x-api-key": key},
                       headers={"anthropic-version": config.anthropic_version})
        self.batches = config.batches
        """It has the Message Batches API (services.workers.providers.batches)."""

    def __repr__(self) -> str:
        return f"<AnthropicProvider {self.api!r}>"

    async def aclose(self) -> None:
        await self.api.aclose()

    async def complete(self, request: ModelRequest, on_text: OnText | None = None) -> Completion:
        answer = _Answer(request, on_text, time.perf_counter())
        await self.api.exchange("messages", {**params(request), "stream": True}, answer.on_event, answer.on_whole)
        return answer.completion()


def params(request: ModelRequest) -> dict[str, Any]:
    """The Messages API's request body for `request` (without `stream`)."""
    system, messages = _messages(request.messages)
    body: dict[str, Any] = {"model": request.model, "messages": messages, "max_tokens": request.max_tokens}
    if system:
        body["system"] = system
    if request.tools:
        body["tools"] = [{"name": tool.name, "description": tool.description, "input_schema": tool.parameters}
                         for tool in request.tools]
    return body


def whole_answer(request: ModelRequest, message: bytes) -> Completion:
    """A Messages API answer that came whole (a `message` object), as a Completion."""
    answer = _Answer(request, None, time.perf_counter())
    answer.on_whole(message)
    return answer.completion()


def _messages(turns: list[Turn]) -> tuple[str, list[dict[str, Any]]]:
    """The top-level system text and the messages: tool results join the user message of the results before
    them (and a user's text after them joins it too), since the API wants the answers to one assistant turn's
    tool calls in the next user message, first."""
    system = "\n\n".join(turn.content for turn in turns if turn.role == "system" and turn.content)
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if turn.role == "system":
            continue
        if turn.role == "tool":
            block = {"type": "tool_result", "tool_use_id": turn.tool_call_id, "content": turn.content,
                     "is_error": turn.is_error}
            if _holds_tool_results(messages):
                messages[-1]["content"].append(block)
            else:
                messages.append({"role": "user", "content": [block]})
        elif turn.role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": turn.content}] if turn.content else []
            blocks += [{"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call.arguments)}
                       for call in turn.tool_calls]
            messages.append({"role": "assistant", "content": blocks or turn.content})
        elif _holds_tool_results(messages):
            messages[-1]["content"].append({"type": "text", "text": turn.content})
        else:
            messages.append({"role": "user", "content": [{"type": "text", "text": turn.content}]})
    return system, messages


def _holds_tool_results(messages: list[dict[str, Any]]) -> bool:
    last = messages[-1] if messages else None
    return (last is not None and last["role"] == "user" and isinstance(last["content"], list)
            and any(block["type"] == "tool_result" for block in last["content"]))


def _input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic wants; {} when the model wrote no JSON object."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
