"""guard: validate a submission, estimate its tokens, apply rate limits and tool rules; pass it on or say why not.

The checks run cheapest first: shape and sizes, tenant and agent kind, tools,
the token estimate against the request cap and the caller's whole budget, and
only then the shared rate limiter (the one check that costs a round trip).
In shadow mode a refusal is recorded on the TaskValidated event and counted,
but the task passes: a new policy can be tried on real traffic before it bites.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec

from contracts import TaskRejected, TaskSubmitted, TaskValidated, TokenEstimate, subjects
from contracts.events import TaskId, Token, clip
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
from services.guard.claims import Claim, record_rejection, take_over
from services.guard.limiter import RateLimiter
from shared.consume import Delivery
from shared.errors import PoisonMessage, Undecodable
from shared.kv import TypedBucket
from shared import plans
from shared.reservations import PART_OVERHEAD
from shared.tokens import count_chat, count_tokens

PLANNED_SUBTASKS = 3
"""Subtasks a manager's plan is expected to have, for the estimate of a task that comes without a plan."""

Emit = Callable[[str, Any], Awaitable[None]]
CurrentPolicy = Callable[[], Policy]


class Identity(msgspec.Struct, frozen=True):
    """Who to answer about a submission, read even when the rest of it is bad. The tenant is the subject's."""

    task_id: TaskId
    user: Token


class Refused(msgspec.Struct, frozen=True):
    """A submission that is not a valid task, with what to tell its publisher."""

    identity: Identity | None
    """None: not even the task id and user could be read, so there is nobody to answer."""
    error: GuardError
    unreadable: bool = False
    """The decoder could not read it at all (not JSON, or nested too deeply), or could not answer it:
    it is kept in the dead-letter stream for operators as well as answered when it can be."""


_submission = msgspec.json.Decoder(TaskSubmitted)
_identity = msgspec.json.Decoder(Identity)
_IDENTITY_FIELD = re.compile(rb'"(task_id|user)"\s*:\s*"([A-Za-z0-9_-]{1,128})"')
"""A task id or user as it appears in raw JSON. Read from the bytes when the decoder cannot read them (JSON
nested deeper than it goes, malformed, or too large to decode): linear in the payload, which the server
bounds. It may find a key nested somewhere inside rather than the top-level one; the answer goes to the
subject's tenant whatever it finds, so a publisher can only mislead itself."""


def decode_submission(data: bytes, max_payload_bytes: int) -> TaskSubmitted | Refused:
    """Decode, or return a Refused naming the problem and, when it can be read, whom to answer. Never raises."""
    if len(data) > max_payload_bytes:
        error: GuardError = PayloadTooLarge(
            f"message is {len(data)} bytes; the limit is {max_payload_bytes}: shorten the prompt or metadata"
        )
        identity = _scan_identity(data)  # not decoded: it may be anything, of any depth
        return Refused(identity=identity, error=error, unreadable=identity is None)
    try:
        return _submission.decode(data)
    except msgspec.ValidationError as exc:
        return _refused(data, InvalidRequest(f"invalid task: {exc}"), unreadable=False)
    except RecursionError:
        return _refused(data, InvalidRequest(
            "the task is nested too deeply for the decoder: metadata values are strings, and no field may hold "
            "JSON nested hundreds of levels deep"), unreadable=True)
    except msgspec.DecodeError as exc:
        return _refused(data, InvalidRequest(f"not a JSON task ({exc}): send one UTF-8 JSON object as "
                                             "contracts/schemas/task.submitted.v1.json describes"), unreadable=True)


def _refused(data: bytes, error: GuardError, *, unreadable: bool) -> Refused:
    try:
        identity: Identity | None = _identity.decode(data)
    except RecursionError:  # skipping the fields Identity lacks recurses too: nested too deeply somewhere
        identity, unreadable = _scan_identity(data), True
    except (msgspec.DecodeError, msgspec.ValidationError):
        identity = _scan_identity(data)
    return Refused(identity=identity, error=error, unreadable=unreadable or identity is None)


def _scan_identity(data: bytes) -> Identity | None:
    found: dict[bytes, bytes] = {}
    for match in _IDENTITY_FIELD.finditer(data):
        found.setdefault(match.group(1), match.group(2))
        if len(found) == 2:
            return Identity(task_id=found[b"task_id"].decode(), user=found[b"user"].decode())
    return None


def check_request(task: TaskSubmitted, policy: Policy) -> None:
    """Raise the GuardError for a request that is malformed, too large, or names what it may not."""
    spec, limits = task.spec, policy.limits
    if task.tenant not in policy.tenants:
        # Not the list of known tenants: a publisher learns nothing of the others.
        raise UnknownTenant(f"tenant {task.tenant!r} is not known: the operator adds tenants to the policy")
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
    check_plan(task, policy)


def check_plan(task: TaskSubmitted, policy: Policy) -> None:
    """An orchestrated task's plan: a DAG within the policy's limits, of agents the policy knows (shared.plans)."""
    spec = task.spec
    if spec.orchestration == "single":
        if spec.plan is not None:
            raise InvalidRequest("a plan needs an orchestration mode: centralized, distributed or hybrid")
        return
    if spec.plan is None:
        return  # the manager agent (spec.agent) makes one; the executor checks it the same way
    try:
        plans.check(spec.plan, policy, task.tenant, task.user, synthesis=spec.agent)
    except plans.UnknownPlanAgent as error:
        raise UnknownAgent(str(error)) from None
    except plans.PlanToolForbidden as error:
        raise ToolForbidden(str(error)) from None
    except plans.PlanInvalid as error:
        raise InvalidRequest(str(error)) from None


def estimate(task: TaskSubmitted, policy: Policy) -> TokenEstimate:
    """Prompt tokens as the agent's model counts them (with chat overhead) plus the expected output; for a plan,
    every subtask's (its instruction with the outputs it needs) and the synthesis's (the request with every
    output)."""
    spec = task.spec
    agent = policy.agents[spec.agent]
    model = agent.chain[0].model if agent.chain else ""
    prompt, output = count_chat(spec.chat(), model), spec.max_tokens or agent.default_output_tokens
    if spec.orchestration == "single":
        return TokenEstimate(prompt_tokens=prompt, max_output_tokens=output)
    if spec.plan is None:  # the manager plans: its plan, then (as a guess) three parts and the synthesis
        parts = PLANNED_SUBTASKS * output
        return TokenEstimate(prompt_tokens=3 * prompt + 2 * parts,
                             max_output_tokens=output + parts + policy.orchestration.synthesis_output_tokens)
    outputs = {sub.id: sub.max_tokens or policy.agents[sub.agent].default_output_tokens for sub in spec.plan.subtasks}
    for sub in spec.plan.subtasks:
        prompt += count_tokens(sub.instruction, model) + PART_OVERHEAD + sum(outputs[n] for n in sub.needs)
    prompt += sum(outputs.values())  # the synthesis reads every output
    return TokenEstimate(prompt_tokens=prompt,
                         max_output_tokens=sum(outputs.values()) + policy.orchestration.synthesis_output_tokens)


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
    def __init__(self, policy: CurrentPolicy, limiter: RateLimiter, emit: Emit, claims: TypedBucket[Claim]) -> None:
        self.policy = policy
        self.limiter = limiter
        self.emit = emit
        self.claims = claims
        self.decisions: Counter[str] = Counter()  # validated, rejected.<reason>, shadow.<reason>, repeated
        self.decision_ms: list[float] = []  # recent decision times, for $SRV.STATS and the bench

    async def on_submission(self, item: TaskSubmitted | Refused, delivery: Delivery) -> None:
        """Judge one submission, answering on the tenant of the subject it came on: that, not its body, says
        who sent it. Raises PoisonMessage (it goes to the dead-letter stream) for what cannot be handled."""
        started = time.perf_counter()
        tenant = subjects.submission_tenant(delivery.subject)
        if tenant is None:  # the ingress stream's subjects have one token there, but it may be no tenant id
            raise PoisonMessage(f"{delivery.subject!r} does not end in a valid tenant id: nobody to answer")
        if isinstance(item, Refused):
            if item.identity is not None:
                await self._reject(tenant, item.identity, item.error, delivery)
            if item.unreadable:
                who = f"answered {tenant}/{item.identity.user}" if item.identity else "no task id and user to answer"
                raise Undecodable(f"{item.error.reason}: {item.error} ({who})")
        elif item.tenant != tenant:
            await self._reject(tenant, item, InvalidRequest(
                f"published on {delivery.subject} (tenant {tenant!r}) but the task names tenant {item.tenant!r}: "
                f"a tenant submits on its own subject; publish on {subjects.task_submitted(item.tenant)} or set "
                f'"tenant": "{tenant}"'), delivery)
        else:
            await self._claimed(item, delivery)
        self.decision_ms.append((time.perf_counter() - started) * 1000)
        del self.decision_ms[:-10_000]

    async def _claimed(self, task: TaskSubmitted, delivery: Delivery) -> None:
        """Decide the task if this submission holds its (tenant, task id); a repeat gets nothing new."""
        mine = Claim(seq=delivery.stream_seq, received_at=delivery.stored_at)
        held = await self.claims.create(task.task_ref, mine)
        if held.seq == mine.seq and held.rejection is not None:  # a redelivery of one refused already
            await self.emit(subjects.task_rejected(task.tenant), held.rejection)
        elif held.seq == mine.seq or await self.claims.update(task.task_ref, partial(take_over, mine=mine)):
            await self._decide(task, self.policy(), delivery)
        else:
            self.decisions["repeated"] += 1

    async def _decide(self, task: TaskSubmitted, policy: Policy, delivery: Delivery) -> None:
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
            await self._reject(task.tenant, task, refusal, delivery, claimed=True)
            return
        if refusal is not None:
            self.decisions[f"shadow.{refusal.reason}"] += 1
        await self._pass(task, tokens, policy, refusal, delivery)

    async def _rate_limit(self, task: TaskSubmitted, tokens: int, policy: Policy) -> None:
        verdict = await self.limiter.admit(task.tenant, task.user, tokens, policy.rate_for(task.tenant, task.user),
                                           policy.tenant_rate_for(task.tenant))
        if not verdict.allowed:
            raise RateLimited(f"{verdict.limit} per minute limit reached for {task.tenant}/{task.user}; "
                              f"retry in {verdict.retry_after_s:.2f} s", retry_after_s=verdict.retry_after_s)

    async def _pass(self, task: TaskSubmitted, tokens: TokenEstimate, policy: Policy,
                    shadow: GuardError | None, delivery: Delivery) -> None:
        if shadow is not None and not tokens.total:  # refused before the estimate: still give one
            tokens = estimate(task, policy) if task.spec.agent in policy.agents else tokens
        high_stakes = policy.tools_for(task.tenant, task.user).high_stakes
        validated = TaskValidated(
            task_id=task.task_id, tenant=task.tenant, user=task.user, spec=task.spec, estimate=tokens,
            high_stakes_tools=[tool for tool in task.spec.tools if tool in high_stakes],
            policy_version=getattr(self.policy, "version", 0),
            shadow_rejection=shadow.reason if shadow else None, shadow_message=clip(str(shadow)) if shadow else "",
            received_at=delivery.stored_at,
        )
        await self.emit(subjects.task_validated(task.tenant), validated)
        self.decisions["validated"] += 1

    async def _reject(self, tenant: str, who: Identity | TaskSubmitted, error: GuardError, delivery: Delivery, *,
                      claimed: bool = False) -> None:
        """Answer `who` on `tenant`'s subject; with `claimed`, keep the answer in the task's claim first."""
        rejected = TaskRejected(task_id=who.task_id, tenant=tenant, user=who.user, reason=error.reason,
                                message=clip(str(error)), stage="guard", retry_after_s=error.retry_after_s,
                                policy_version=getattr(self.policy, "version", 0), received_at=delivery.stored_at)
        if claimed:
            await self.claims.update(rejected.task_ref, partial(record_rejection, seq=delivery.stream_seq,
                                                                rejection=rejected))
        await self.emit(subjects.task_rejected(tenant), rejected)
        self.decisions[f"rejected.{error.reason}"] += 1
