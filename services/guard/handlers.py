"""guard: validate a submission, estimate its tokens, pass it on or say why not."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from contracts import TaskRejected, TaskSubmitted, TaskValidated, TokenEstimate, subjects
from contracts.events import TaskId, Token
from services.guard.errors import GuardError, InvalidRequest, PayloadTooLarge, UnknownAgent, UnknownTenant
from contracts.policy import Policy
from shared.tokens import count_tokens

Emit = Callable[[str, Any], Awaitable[None]]


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


def check(task: TaskSubmitted, policy: Policy) -> TokenEstimate:
    """Raise the GuardError that refuses `task`, or return its token estimate."""
    spec, limits = task.spec, policy.limits
    if task.tenant not in policy.tenants:
        raise UnknownTenant(f"tenant {task.tenant!r} is not known; known tenants: {', '.join(policy.tenants)}")
    agent = policy.agents.get(spec.agent)
    if agent is None:
        raise UnknownAgent(f"agent kind {spec.agent!r} is not known; use one of: {', '.join(sorted(policy.agents))}")
    if not spec.prompt.strip():
        raise InvalidRequest("prompt is empty: send the text the agent should work on")
    prompt_bytes = len(spec.prompt.encode())
    if prompt_bytes > limits.max_prompt_bytes:
        raise PayloadTooLarge(f"prompt is {prompt_bytes} bytes; the limit is {limits.max_prompt_bytes}")
    if len(spec.tools) > limits.max_tools:
        raise InvalidRequest(f"{len(spec.tools)} tools named; at most {limits.max_tools} are allowed")
    if spec.max_tokens is not None and not 1 <= spec.max_tokens <= limits.max_output_tokens:
        raise InvalidRequest(f"max_tokens must be within 1..{limits.max_output_tokens}, got {spec.max_tokens}")
    output = spec.max_tokens or agent.default_output_tokens
    return TokenEstimate(prompt_tokens=count_tokens(spec.prompt), max_output_tokens=output)


async def handle_submission(item: TaskSubmitted | Refused, *, policy: Callable[[], Policy], emit: Emit) -> None:
    if isinstance(item, Refused):
        await _reject(item.identity, item.error, emit)
        return
    try:
        estimate = check(item, policy())
    except GuardError as error:
        await _reject(item, error, emit)
        return
    validated = TaskValidated(task_id=item.task_id, tenant=item.tenant, user=item.user, spec=item.spec,
                              estimate=estimate)
    await emit(subjects.task_validated(item.tenant), validated)


async def _reject(who: Identity | TaskSubmitted, error: GuardError, emit: Emit) -> None:
    rejected = TaskRejected(task_id=who.task_id, tenant=who.tenant, user=who.user, reason=error.reason,
                            message=str(error), stage="guard")
    await emit(subjects.task_rejected(who.tenant), rejected)
