"""Records kept in KV buckets that services other than the owner may read (never write)."""

from __future__ import annotations

import msgspec

from contracts.events import BreakerStateName


def dependency_key(provider: str, model: str) -> str:
    """The breaker key of a model: `provider/model` (valid as a KV key and a subject token)."""
    return f"{provider}/{model}"


class BreakerRecord(msgspec.Struct, kw_only=True):
    """One dependency's circuit, in the `corral_breakers` bucket (written by the breaker only)."""

    dependency: str
    state: BreakerStateName = "closed"
    consecutive_failures: int = 0
    opened_at: float = 0.0
    """Unix seconds the circuit last opened."""
    retry_at: float = 0.0
    """Unix seconds from which an open circuit lets a probe through (half-open)."""
    changed_at: float = 0.0

    def allows_calls(self, now: float) -> bool:
        """False only while the circuit is open and its wait has not passed."""
        return self.state != "open" or now >= self.retry_at
