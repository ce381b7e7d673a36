"""The agent workers' response cache: an answer kept per tenant and agent, served instead of a model call.

The workers own the `corral_responses` bucket; nothing else writes it. A key is
`TENANT.AGENT.DIGEST`, the digest a SHA-256 of everything that changes the answer: tenant, agent, provider,
model, the normalised conversation (the agent's system prompt included), the tools offered and the sampling
parameters (max_tokens: the contracts carry no other). A lookup reads only keys under the step's own tenant,
and an entry says whose it is: an entry whose tenant, agent or digest is not the one asked for, that has
outlived the agent's TTL, or that does not decode, is never served; it is reported (shared/quarantine.py) and
deleted. So no prompt can reach another tenant's answers, and a bad value in the bucket costs one model call.

Entries expire by nats-server's per-message TTL (the agent's `ttl_s`); the bucket's stream is bounded in
messages and bytes and drops the oldest first (discard old), so a full cache forgets rather than refuses.

What is not kept: a step that called tools (its answer depends on what they said) and a request that asks
about now (today, latest, current…), unless the agent's policy says to; and an empty answer.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable

import msgspec
from nats.js.api import DiscardPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from contracts import StepRequested, Usage, subjects
from contracts.events import CacheHit
from contracts.policy import Price, ResponseCache
from services.workers.conversation import Turn
from shared.config import Settings
from shared.quarantine import Quarantine
from shared.streams import declare_bucket

log = logging.getLogger(__name__)
MAX_ENTRIES = 100_000
MAX_BYTES = 256 * 1024 * 1024
MAX_ANSWER_CHARS = 1 << 20
CLOCK_SKEW_S = 60.0
TIME_SENSITIVE = re.compile(
    r"\b(today|tonight|now|yesterday|tomorrow|current(ly)?|latest|recent(ly)?|this (week|month|year)|"
    r"at the moment|as of|heute|aujourd'hui|hoy)\b", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class CachedAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """One answer as the bucket keeps it; it names the request it answers, checked before it is served."""

    tenant: str
    agent: str
    digest: str
    scope: str
    """Digest of what besides the conversation must match (model, tools, sampling, system prompt)."""
    model: str
    text: str
    """The request's normalised conversation, for the semantic cache's checks."""
    answer: str
    usage: Usage
    stored_at: float
    embedding: bytes = b""
    """float32 little-endian: the request's embedding (semantic entries)."""


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """What a step asks, as the cache knows it."""

    tenant: str
    agent: str
    model: str
    digest: str
    scope: str
    text: str

    @property
    def key(self) -> str:
        return entry_key(self.tenant, self.agent, self.digest)


def entry_key(tenant: str, agent: str, digest: str) -> str:
    return f"{tenant}.{agent}.{digest}"


def normalise(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def describe(step: StepRequested, messages: Iterable[Turn], tools: Iterable[str]) -> Request:
    """The step's request: its digest (the exact key), its scope and its conversation text."""
    turns = [(t.role, t.name, normalise(t.content)) for t in messages]
    system = [t for t in turns if t[0] == "system"]
    scope_parts = [step.tenant, step.agent, step.provider, step.model, step.max_tokens, sorted(tools), system]
    scope = hashlib.sha256(msgspec.msgpack.encode(scope_parts)).hexdigest()
    digest = hashlib.sha256(msgspec.msgpack.encode([scope, turns])).hexdigest()
    text = "\n".join(content for role, _, content in turns if role != "system")
    return Request(tenant=step.tenant, agent=step.agent, model=step.model, digest=digest, scope=scope, text=text)


def cacheable(request: Request, settings: ResponseCache, answer: str, tool_calls: int) -> str:
    """Why this answer must not be kept (empty: it may be)."""
    if not answer.strip():
        return "the answer is empty"
    if tool_calls and not settings.cache_tool_answers:
        return "the step called tools"
    if not settings.cache_time_sensitive and TIME_SENSITIVE.search(request.text):
        return "the request asks about now"
    return ""


def billed(saved: Usage, settings: ResponseCache) -> Usage:
    """What a hit is billed: `hit_billing` of the tokens it saved."""
    share = settings.hit_billing
    return Usage(input_tokens=round(saved.input_tokens * share), output_tokens=round(saved.output_tokens * share),
                 cached_tokens=round(saved.cached_tokens * share), estimated=saved.estimated)


def hit(source: str, entry: CachedAnswer, settings: ResponseCache, price: Price,
        similarity: float = 1.0) -> tuple[CacheHit, Usage]:
    """The StepCompleted's account of a hit, and the usage it bills."""
    bill = billed(entry.usage, settings)
    avoided = max(0.0, price.cost(entry.usage) - price.cost(bill))
    return CacheHit(source=source, saved=entry.usage, cost_avoided_usd=round(avoided, 9),
                    similarity=max(-1.0, min(1.0, similarity)), stored_at=entry.stored_at), bill


async def declare(js, settings: Settings, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> KeyValue:
    """The bucket, bounded: at most `max_entries` answers and `max_bytes`, the oldest dropped first."""
    kv = await declare_bucket(js, settings, subjects.KV_RESPONSES)
    info = await js.stream_info(f"KV_{subjects.KV_RESPONSES}")
    config = info.config
    if (config.max_msgs, config.max_bytes, config.discard) != (max_entries, max_bytes, DiscardPolicy.OLD):
        config.max_msgs, config.max_bytes, config.discard = max_entries, max_bytes, DiscardPolicy.OLD
        await js.update_stream(config)
    return kv


class Store:
    """The bucket, read and written as the cache's rules say."""

    def __init__(self, kv: KeyValue, quarantine: Quarantine, clock=time.time) -> None:
        self.kv = kv
        self.quarantine = quarantine
        self.clock = clock
        self._decode = msgspec.json.Decoder(CachedAnswer).decode
        self._encode = msgspec.json.Encoder().encode
        self.refused = 0
        """Entries found bad (undecodable, someone else's, too old) and deleted."""

    async def get(self, request: Request, settings: ResponseCache, key: str | None = None) -> CachedAnswer | None:
        """The answer kept under `key` (default: the request's exact key) if it may serve this request."""
        key = key or request.key
        if not key.startswith(f"{request.tenant}.{request.agent}."):
            raise ValueError(f"key {key!r} is outside {request.tenant}/{request.agent}")  # a caller's bug
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        try:
            answer = self._decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            return await self._refuse(key, entry.revision or 0, entry.value, error)
        why = self.invalid(answer, request, settings, key)
        if why:
            return await self._refuse(key, entry.revision or 0, entry.value, ValueError(why))
        return answer

    def invalid(self, answer: CachedAnswer, request: Request, settings: ResponseCache, key: str) -> str:
        """Why `answer` (read under `key`) must not serve `request` (empty: it may)."""
        now = self.clock()
        if (answer.tenant, answer.agent) != (request.tenant, request.agent):
            return f"the entry belongs to {answer.tenant}/{answer.agent}"
        if key != entry_key(answer.tenant, answer.agent, answer.digest):
            return "the entry's digest is not its key's"
        if answer.scope != request.scope or answer.model != request.model:
            return "the entry answers another model, tool set or system prompt"
        if not answer.answer.strip() or len(answer.answer) > MAX_ANSWER_CHARS:
            return "the entry's answer is empty or oversized"
        if answer.stored_at > now + CLOCK_SKEW_S or now - answer.stored_at > settings.ttl_s:
            return "the entry is older than the agent's TTL (or from the future)"
        return ""

    async def _refuse(self, key: str, revision: int, value: bytes, error: Exception) -> None:
        self.refused += 1
        await self.quarantine.keep(subjects.KV_RESPONSES, key, revision, value, error)
        try:
            await self.kv.delete(key, last=revision)
        except Exception as exc:  # noqa: BLE001 - written again since, or gone: either way not served now
            log.info("response cache: %s not deleted (%s)", key, exc)
        return None

    async def put(self, request: Request, settings: ResponseCache, answer: str, usage: Usage,
                  embedding: bytes = b"") -> None:
        value = CachedAnswer(tenant=request.tenant, agent=request.agent, digest=request.digest, scope=request.scope,
                             model=request.model, text=request.text, answer=answer, usage=usage,
                             stored_at=self.clock(), embedding=embedding)
        try:  # the first answer stored stays until it expires (another replica may have stored one)
            await self.kv.create(request.key, self._encode(value), msg_ttl=settings.ttl_s)
        except KeyWrongLastSequenceError:
            pass
