"""guard: validate a submission, estimate its tokens, apply rate limits and tool rules; pass it on or say why not.

The checks run cheapest first: shape and sizes, tenant and agent kind, tools,
the token estimate against the request cap and the caller's whole budget, and
only then the shared rate limiter (the one check that costs a round trip).
In shadow mode a refusal is recorded on the TaskValidated event and counted,
but the task passes: a new policy can be tried on real traffic before it bites.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from contracts import TaskRejected, TaskSubmitted, TaskValidated, TokenEstimate, subjects
from contracts.events import TaskId, Token
from contracts.policy import Policy
from services.guard.errors import (
    GuardError,
    InvalidRequest,
    OverBudget,
    PayloadTooLarge,
    RateLimited,
    ToolForbidden,
    UnknownAgent,
    UnknownTenant,
)
from services.guard.limiter import RateLimiter
from shared.tokens import count_chat

Emit = Callable[[str, Any], Awaitable[None]]
CurrentPolicy = Callable[[], Policy]


class Identity(msgspec.Struct, frozen=True):
    """The part of a submission needed to answer it, read even when the rest is bad."""

    task_id: TaskId
    tenant: Token
    user: Token


class Refused(msgspec.Struct, frozen=True):
    """A submission that did not decode or is too large, with what to tell its publisher."""

    identity: Identity
    error: GuardError


_submission = msgspec.json.Decoder(TaskSubmitted)
_identity = msgspec.json.Decoder(Identity)


def decode_submission(data: bytes, max_payload_bytes: int) -> TaskSubmitted | Refused:
    """Decode, or return a Refused naming the problem. Raises only when not even the
    identity can be read; that message goes to the dead-letter stream."""
    if len(data) > max_payload_bytes:
        error: GuardError = PayloadTooLarge(
            f"message is {len(data)} bytes; the limit is {max_payload_bytes}: shorten the prompt or metadata"
        )
        return Refused(identity=_identity.decode(data), error=error)
    try:
        return _submission.decode(data)
    except msgspec.ValidationError as exc:
        return Refused(identity=_identity.decode(data), error=InvalidRequest(f"invalid task: {exc}"))


def check_request(task: TaskSubmitted, policy: Policy) -> None:
    """Raise the GuardError for a request that is malformed, too large, or names what it may not."""
    spec, limits = task.spec, policy.limits
    if task.tenant not in policy.tenants:
        raise UnknownTenant(f"tenant {task.tenant!r} is not known; known tenants: {', '.join(policy.tenants)}")
    if spec.agent not in policy.agents:
        raise UnknownAgent(f"agent kind {spec.agent!r} is not known; use one of: {', '.join(sorted(policy.agents))}")
    if not spec.prompt.strip() and not any(m.content.strip() for m in spec.messages):
        raise InvalidRequest("prompt is empty: send the text the agent should work on (prompt or messages)")
    prompt_bytes = len(spec.prompt.encode()) + sum(len(m.content.encode()) for m in spec.messages)
    if prompt_bytes > limits.max_prompt_bytes:
        raise PayloadTooLarge(f"prompt is {prompt_bytes} bytes; the limit is {limits.max_prompt_bytes}")
    if len(spec.messages) > limits.max_messages:
        raise InvalidRequest(f"{len(spec.messages)} messages; at most {limits.max_messages} are allowed")
    if len(spec.tools) > limits.max_tools:
        raise InvalidRequest(f"{len(spec.tools)} tools named; at most {limits.max_tools} are allowed")
    metadata_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in spec.metadata.items())
    if len(spec.metadata) > limits.max_metadata_entries or metadata_bytes > limits.max_metadata_bytes:
        raise InvalidRequest(f"metadata has {len(spec.metadata)} entries / {metadata_bytes} bytes; at most "
                             f"{limits.max_metadata_entries} entries and {limits.max_metadata_bytes} bytes")
    if spec.max_tokens is not None and not 1 <= spec.max_tokens <= limits.max_output_tokens:
        raise InvalidRequest(f"max_tokens must be within 1..{limits.max_output_tokens}, got {spec.max_tokens}")
    rules = policy.tools_for(task.tenant, task.user)
    for tool in spec.tools:
        if "*" not in rules.allowed and tool not in rules.allowed:
            raise ToolForbidden(f"tool {tool!r} is not allowed for {task.tenant}/{task.user}; allowed: "
                                f"{', '.join(rules.allowed) or 'none'}")


def estimate(task: TaskSubmitted, policy: Policy) -> TokenEstimate:
    """Prompt tokens as the agent's model counts them (with chat overhead) plus the expected output."""
    agent = policy.agents[task.spec.agent]
    model = agent.chain[0].model if agent.chain else ""
    output = task.spec.max_tokens or agent.default_output_tokens
    return TokenEstimate(prompt_tokens=count_chat(task.spec.chat(), model), max_output_tokens=output)


def check_estimate(task: TaskSubmitted, tokens: int, policy: Policy) -> None:
    """Refuse at once what can never fit: the request cap or the caller's whole budget.
    The remaining budget is the budget service's to judge, not the guard's."""
    cap = policy.limits.max_request_tokens
    if tokens > cap:
        raise OverBudget(f"this request needs about {tokens:,} tokens; the per-request cap is {cap:,}: "
                         "lower max_tokens or shorten the prompt")
    budget = policy.budget_for(task.tenant, task.user)
    windows = [("per-task", budget.per_task_tokens), ("hourly", budget.hourly_tokens), ("daily", budget.daily_tokens)]
    for name, limit in sorted((w for w in windows if w[1] is not None), key=lambda w: w[1]):  # the tightest first
        if tokens > limit:
            raise OverBudget(f"this request needs about {tokens:,} tokens, more than your whole {name} budget "
                             f"of {limit:,}: lower max_tokens or ask for a larger budget")
    burst = policy.rate_for(task.tenant, task.user).burst_tokens
    if tokens > burst:
        raise RateLimited(f"this request needs about {tokens:,} tokens, more than the {burst:,}-token burst your "
                          "rate limit allows at once: lower max_tokens", retry_after_s=None)


class Guard:
    def __init__(self, policy: CurrentPolicy, limiter: RateLimiter, emit: Emit) -> None:
        self.policy = policy
        self.limiter = limiter
        self.emit = emit
        self.decisions: Counter[str] = Counter()  # validated, rejected.<reason>, shadow.<reason>
        self.decision_ms: list[float] = []  # recent decision times, for $SRV.STATS and the bench

    async def on_submission(self, item: TaskSubmitted | Refused) -> None:
        started = time.perf_counter()
        if isinstance(item, Refused):
            await self._reject(item.identity, item.error)
        else:
            await self._decide(item, self.policy())
        self.decision_ms.append((time.perf_counter() - started) * 1000)
        del self.decision_ms[:-10_000]

    async def _decide(self, task: TaskSubmitted, policy: Policy) -> None:
        refusal: GuardError | None = None
        tokens = TokenEstimate(prompt_tokens=0, max_output_tokens=0)
        try:
            check_request(task, policy)
            tokens = estimate(task, policy)
            check_estimate(task, tokens.total, policy)
            await self._rate_limit(task, tokens.total, policy)
        except GuardError as error:
            refusal = error
        if refusal is not None and not policy.shadow:
            await self._reject(task, refusal)
            return
        if refusal is not None:
            self.decisions[f"shadow.{refusal.reason}"] += 1
        await self._pass(task, tokens, policy, refusal)

    async def _rate_limit(self, task: TaskSubmitted, tokens: int, policy: Policy) -> None:
        verdict = await self.limiter.admit(task.tenant, task.user, tokens, policy.rate_for(task.tenant, task.user),
                                           policy.tenant_rate_for(task.tenant))
        if not verdict.allowed:
            raise RateLimited(f"{verdict.limit} per minute limit reached for {task.tenant}/{task.user}; "
                              f"retry in {verdict.retry_after_s:.2f} s", retry_after_s=verdict.retry_after_s)

    async def _pass(self, task: TaskSubmitted, tokens: TokenEstimate, policy: Policy,
                    shadow: GuardError | None) -> None:
        if shadow is not None and not tokens.total:  # refused before the estimate: still give one
            tokens = estimate(task, policy) if task.spec.agent in policy.agents else tokens
        high_stakes = policy.tools_for(task.tenant, task.user).high_stakes
        validated = TaskValidated(
            task_id=task.task_id, tenant=task.tenant, user=task.user, spec=task.spec, estimate=tokens,
            high_stakes_tools=[tool for tool in task.spec.tools if tool in high_stakes],
            policy_version=getattr(self.policy, "version", 0),
            shadow_rejection=shadow.reason if shadow else None, shadow_message=str(shadow) if shadow else "",
        )
        await self.emit(subjects.task_validated(task.tenant), validated)
        self.decisions["validated"] += 1

    async def _reject(self, who: Identity | TaskSubmitted, error: GuardError) -> None:
        rejected = TaskRejected(task_id=who.task_id, tenant=who.tenant, user=who.user, reason=error.reason,
                                message=str(error), stage="guard", retry_after_s=error.retry_after_s,
                                policy_version=getattr(self.policy, "version", 0))
        await self.emit(subjects.task_rejected(who.tenant), rejected)
        self.decisions[f"rejected.{error.reason}"] += 1
