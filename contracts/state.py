"""Records kept in KV buckets that services other than the owner may read (never write)."""

from __future__ import annotations

import re

import msgspec

from contracts.events import BreakerStateName

CACHE_DEPENDENCY = "cache"
"""What a cached answer names as its dependency (it calls nothing, so it has no breaker)."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def dependency_key(provider: str, model: str) -> str:
    """The breaker key of a model: `provider/model` (valid as a KV key and a subject token)."""
    return f"{provider}/{model}"


def tool_key(tool: str) -> str:
    """The breaker key of a tool: `tool/NAME`, with anything a KV key cannot hold replaced by '_'."""
    return f"tool/{_UNSAFE.sub('_', tool)}"


class Bucket(msgspec.Struct, array_like=True):
    """One second of a time-based window: [unix second, calls, failures, slow calls]."""

    second: int
    calls: int = 0
    failures: int = 0
    slow: int = 0


class Lease(msgspec.Struct, kw_only=True):
    """A half-open probe granted to one call; its outcome (matched by call id) settles the circuit."""

    call_id: str
    holder: str
    expires_at: float


class BreakerRecord(msgspec.Struct, kw_only=True):
    """One dependency's circuit, in the `corral_breakers` bucket (written by the breaker only).

    Outcomes are kept as a count window (`recent`, one letter per call, newest last:
    o ok, f failed, s slow ok, x slow failed) or as a time window (`buckets`, one per
    second), whichever the dependency's settings name."""

    dependency: str
    state: BreakerStateName = "closed"
    consecutive_failures: int = 0
    opened_at: float = 0.0
    """Unix seconds the circuit last opened."""
    retry_at: float = 0.0
    """Unix seconds from which an open circuit lets probes through (half-open)."""
    changed_at: float = 0.0
    forced: bool = False
    """An operator forced `state` (open or closed): no automatic transition until released."""
    forced_by: str = ""
    recent: str = ""
    buckets: list[Bucket] = []
    leases: list[Lease] = []
    """Half-open probes granted and not yet settled, across every replica."""
    probes: str = ""
    """Outcomes of the settled half-open probes (same letters as `recent`)."""
    failure_rate: float = 0.0
    """Percent, as of the last recorded call (or the probes, in half-open)."""
    slow_call_rate: float = 0.0
    calls: int = 0
    """Calls the rates were computed over."""
    generation: int = 0
    """Transitions so far; identifies each BreakerChanged."""
    reason: str = ""
    """Why the circuit is in its state, in words."""
    cause_at: float = 0.0
    """Unix seconds of what caused the last transition: the end of the call that tripped or settled it, the
    end of the wait in open, or the operator's command."""

    def allows_calls(self, now: float) -> bool:
        """False while the circuit refuses every call: forced open, or open with its wait not passed."""
        if self.forced:
            return self.state != "open"
        return self.state != "open" or now >= self.retry_at
