"""Commands: requests that something be done, imperative, one frozen tagged Struct each.

They travel by request/reply on NATS micro endpoints (subjects in subjects.py),
not in streams: the answer is the point, and a command nobody answered is simply
sent again. Replies are in queries.py.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from contracts.events import (CONTRACT_VERSION, DependencyKey, ErrorClass, Label, Seconds, StepId, SubtaskId, TaskId,
                             Token, TokenCount, Version)


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    version: Version = CONTRACT_VERSION


class AcquireProbe(Command, frozen=True, kw_only=True, tag="breaker.acquire_probe"):
    """Ask the breaker for one of a half-open circuit's probe leases, for one call.

    Idempotent per (dependency, call_id): asking again for the same call returns the same answer."""

    dependency: DependencyKey
    call_id: StepId
    """The step id that will make the call; its outcome settles the lease."""
    holder: Label
    """Which replica asks (host-pid), for operators."""


BreakerAction = Literal["force_open", "force_closed", "release"]


class ControlBreaker(Command, frozen=True, kw_only=True, tag="breaker.control"):
    """An operator forces a circuit open or closed (it stays so until released), or releases it."""

    dependency: DependencyKey
    action: BreakerAction
    operator: Label = ""


SimulationMode = Literal["fail", "slow", "recover"]


class SimulateDependency(Command, frozen=True, kw_only=True, tag="sim.control"):
    """Tell every SIMULATED worker replica how a dependency behaves from now on.

    fail: every call fails with `error`; slow: every call takes `latency_s` more; recover: back to normal.
    A call still waiting out the `latency_s` of a fault returns when the next command for its dependency comes."""

    dependency: DependencyKey
    """`simulated/MODEL` or `tool/NAME`."""
    mode: SimulationMode
    error: ErrorClass = "transient"
    latency_s: Seconds = 0.0
    retry_after_s: Seconds | None = None
    """With error rate_limited: the retry-after the dependency answers with."""


class ExtendReservation(Command, frozen=True, kw_only=True, tag="budget.extend"):
    """Reserve more for a running task, for one part of it (a subtask, or its synthesis) that would take it past
    what it holds: from the user's windows and the tenant's, as at admission.

    Idempotent per (task, part): asking again for the same part answers as the first time did."""

    tenant: Token
    user: Token
    task_id: TaskId
    part: SubtaskId
    """The subtask's id, or `synthesis`."""
    tokens: TokenCount


COMMAND_CONTRACTS = (AcquireProbe, ControlBreaker, SimulateDependency, ExtendReservation)
