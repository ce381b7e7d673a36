"""Prompt compaction (an agent's opt-in `compaction` policy): fewer input tokens for the same request.

In order: whitespace normalised (runs of spaces and tabs to one, trailing spaces and runs of blank lines
dropped); an instruction line said again, in any earlier message, removed (lines of a few words are kept: a
repeated "yes" is an answer, not an instruction); tool outputs in the history cut to the policy's size; then
the conversation trimmed to `history_tokens`, oldest turns first, always keeping every system message and the
latest `keep_turns` turns. Token counts are tiktoken's (shared/tokens.py), before and after.
"""

from __future__ import annotations

import re

import msgspec

from contracts.events import PromptCompacted, clip
from contracts.policy import Compaction
from services.workers.conversation import Turn
from shared.tokens import count_tokens

_SPACES = re.compile(r"[ \t\f\v]+")
_BLANKS = re.compile(r"\n{3,}")
MIN_INSTRUCTION_WORDS = 4


def tokens(messages: list[Turn], model: str = "") -> int:
    return sum(count_tokens(m.content, model) + 4 for m in messages)  # 4: a message's framing, as count_chat


def whitespace(text: str) -> str:
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.strip().splitlines()]
    return _BLANKS.sub("\n\n", "\n".join(lines))


def _without_repeats(messages: list[Turn]) -> list[Turn]:
    seen: set[str] = set()
    kept = []
    for message in messages:
        lines = []
        for line in message.content.split("\n"):
            key = line.strip().lower()
            if len(key.split()) >= MIN_INSTRUCTION_WORDS and message.role in ("system", "user"):
                if key in seen:
                    continue
                seen.add(key)
            lines.append(line)
        kept.append(msgspec.structs.replace(message, content="\n".join(lines)))
    return kept


def _trimmed(messages: list[Turn], settings: Compaction, model: str) -> list[Turn]:
    """Oldest non-system turns out until the whole fits `history_tokens` (the latest `keep_turns` stay). A tool
    turn goes with the assistant turn that called it, so no tool result is left without its call."""
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    budget = settings.history_tokens - tokens(system, model)
    while len(turns) > settings.keep_turns and tokens(turns, model) > budget:
        turns.pop(0)
        while turns and turns[0].role == "tool" and len(turns) > settings.keep_turns:
            turns.pop(0)
    return [*system, *turns]


def compact(messages: list[Turn], settings: Compaction, model: str = "") -> tuple[list[Turn], PromptCompacted]:
    before = tokens(messages, model)
    shaped = [msgspec.structs.replace(
        m, content=clip(whitespace(m.content), settings.max_tool_output_chars) if m.role == "tool"
        else whitespace(m.content)) for m in messages]
    shaped = [m for m in _without_repeats(shaped) if m.content or m.tool_calls or m.role != "user"]
    trimmed = _trimmed(shaped, settings, model)
    return trimmed, PromptCompacted(tokens_before=before, tokens_after=tokens(trimmed, model),
                                    dropped_turns=len(shaped) - len(trimmed))
