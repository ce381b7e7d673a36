"""The SIMULATED model provider: deterministic text, real token counts, injected latency and failures.

It calls no model. It exists for the default demo, the tests and the benchmarks,
and it is named `simulated` wherever it appears (dependency keys, model names,
outputs). Its output is a function of the prompt alone, so runs are repeatable.

Directives in a prompt steer it (tests and demos use them; real providers ignore them):
    [sim:fail=transient|permanent|timeout|rate_limited]   every attempt fails with that class
    [sim:flaky=N]                                          the first N attempts fail (transient)
    [sim:latency=S]                                        this call takes S seconds
"""

from __future__ import annotations

import hashlib
import re

import anyio
import msgspec

from contracts import ChatMessage, Usage
from services.workers.errors import (
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    TransientProviderError,
)
from shared.tokens import count_chat, count_tokens, encoding

NAME = "simulated"
_DIRECTIVE = re.compile(r"\[sim:(fail|flaky|latency)=([A-Za-z0-9_.]+)\]")
_ERRORS: dict[str, type[ProviderError]] = {
    "transient": TransientProviderError,
    "permanent": PermanentProviderError,
    "timeout": ProviderTimeout,
    "rate_limited": ProviderRateLimited,
}
_WORDS = ("agent", "plan", "result", "source", "evidence", "draft", "code", "test", "summary", "risk", "budget",
          "latency", "trace", "step", "answer", "review", "data", "model", "tool", "context", "finding")


class Completion(msgspec.Struct, frozen=True):
    text: str
    usage: Usage


class SimulatedProvider:
    """A stand-in for a model API. Configure its base latency and failure rate."""

    name = NAME

    def __init__(self, latency_s: float = 0.05, failure_rate: float = 0.0) -> None:
        self.latency_s = latency_s
        self.failure_rate = failure_rate

    async def complete(self, *, model: str, messages: list[ChatMessage], max_tokens: int, call_id: str,
                       attempt: int) -> Completion:
        prompt = "\n".join(message.content for message in messages)
        directives = dict(_DIRECTIVE.findall(prompt))
        await anyio.sleep(float(directives.get("latency", self.latency_s)))
        self._maybe_fail(directives, call_id, attempt)
        text = _generate(model, prompt, max_tokens)
        # Billed like a chat API: the conversation with its per-message overhead, then the reply.
        return Completion(text=text, usage=Usage(input_tokens=count_chat(messages, model),
                                                 output_tokens=count_tokens(text, model)))

    def _maybe_fail(self, directives: dict[str, str], call_id: str, attempt: int) -> None:
        if "fail" in directives:
            error = _ERRORS.get(directives["fail"], TransientProviderError)
            raise error(f"simulated {error.error_class} failure (requested by the prompt)",
                        retry_after_s=0.2 if error is ProviderRateLimited else None)
        if attempt <= int(directives.get("flaky", "0")):
            raise TransientProviderError(f"simulated transient failure on attempt {attempt}")
        if _fraction(call_id) < self.failure_rate:
            raise TransientProviderError("simulated transient failure (sim_failure_rate)")


def _fraction(key: str) -> float:
    """A stable number in [0, 1) for `key`."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _generate(model: str, prompt: str, max_tokens: int) -> str:
    digest = hashlib.sha256(f"{model}\0{prompt}".encode()).digest()
    words = max(8, min(max_tokens // 2, 24 + digest[0] % 96))
    body = " ".join(_WORDS[digest[i % len(digest)] % len(_WORDS)] for i in range(words))
    tokens = encoding().encode_ordinary(f"[simulated {model}] {body}.")
    return encoding().decode(tokens[:max_tokens])  # a real model stops at max_tokens too
