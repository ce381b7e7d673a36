"""What a worker and its models and tools say to each other inside one step, whatever the provider.

These types never travel on the bus: a step's conversation lives in the worker that runs it.
Each provider translates them to its own wire format (OpenAI's chat completions, Anthropic's
messages) and back; each tool takes the arguments a model wrote and returns text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import msgspec

from contracts.events import Usage


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A tool as a model is told of it: its name, what it does and its arguments' JSON Schema."""

    name: str
    description: str
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call a model asked for; `arguments` is the JSON text it wrote, not yet trusted."""

    id: str
    name: str
    arguments: str = "{}"


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """One message of the conversation. An assistant turn may carry tool calls; a tool turn answers the
    call `tool_call_id` (`is_error`: the tool refused or failed, and the model is told so)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = []
    tool_call_id: str = ""
    name: str = ""
    is_error: bool = False


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    messages: list[Turn]
    max_tokens: int
    tools: list[ToolSpec] = []
    call_id: str = ""
    """The step id: the simulated provider derives its behaviour from it; real ones may log it."""
    attempt: int = 1


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A model's answer: text, tool calls, or both, with the usage it reported (`usage.estimated` when it
    reported none and the provider counted with tiktoken)."""

    text: str
    usage: Usage
    tool_calls: list[ToolCall] = []
    finish_reason: str = ""
    """As the provider said it (`stop`, `length`, `tool_calls`, `end_turn`, …): reported, never relied on."""
    response_model: str = ""
    """The model the provider says answered (it may differ from the one asked for)."""
    first_token_s: float | None = None
    """Seconds from sending the request to the first streamed token (None: not streamed, or no token)."""


OnText = Callable[[str], None]
"""Called with each piece of answer text as it streams in (never with tool-call arguments)."""


class Provider(Protocol):
    """A model API. Failures raise the ProviderError subclass of their class (services.workers.errors)."""

    name: str
    """The policy's name for it (`openai`, `local`, …): the first part of its dependency keys."""
    system: str
    """Its protocol's provider name for traces (`gen_ai.provider.name`): `openai`, `anthropic`, `simulated`."""

    async def complete(self, request: ModelRequest, on_text: OnText | None = None) -> Completion: ...


class Tool(Protocol):
    """A tool a model may call. `run` returns the text the model is given; it raises ToolError when the tool
    answered with an error (the model is told, the dependency is healthy), and a ProviderError subclass when
    the dependency itself failed (its breaker counts it and the step fails with that class)."""

    spec: ToolSpec
    dependency: str
    """Its breaker's key: `tool/NAME` for a built-in or plug-in, `mcp/SERVER/TOOL` for an MCP server's."""

    async def run(self, arguments: dict[str, Any]) -> str: ...
