"""A live, read-only view of every breaker, following the breaker service's KV bucket, and the
gate that executors and workers pass before calling a dependency.

    call   the circuit is closed (or forced closed): call it
    skip   open (or forced open) and its wait has not passed: do not call; move on at once
    probe  half-open, or open with its wait passed: call only with a probe lease from the breaker

The lease is asked of the breaker service (request/reply): it alone writes the
bucket, and the lease is a compare-and-set on the dependency's record, so the
permitted number of probes holds across every replica together.

A record that does not decode is quarantined (shared/quarantine.py) and the view keeps
what it knew of that dependency (nothing, at start: its calls go ahead) until the
breaker writes a good record over it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio
import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.commands import AcquireProbe
from contracts.queries import ProbeGrant
from contracts.state import BreakerRecord
from shared.quarantine import Quarantine
from shared.watch import follow_bucket

log = logging.getLogger(__name__)
_decode = msgspec.json.Decoder(BreakerRecord).decode
_grant = msgspec.json.Decoder(ProbeGrant).decode
Admission = Literal["call", "probe", "skip"]
AcquireLease = Callable[[str, str], Awaitable[bool]]
"""(dependency, call id) -> granted."""
PROBE_REQUEST_TIMEOUT_S = 2.0


class BreakerView:
    def __init__(self, quarantine: Quarantine | None = None) -> None:
        self.quarantine = quarantine or Quarantine()
        self.records: dict[str, BreakerRecord] = {}
        self.seen: dict[str, tuple[str, bool, float]] = {}
        """dependency -> (state, forced, unix time this process first saw it so)."""

    def admission(self, dependency: str, now: float | None = None) -> Admission:
        record = self.records.get(dependency)
        if record is None:
            return "call"
        if record.forced or record.state == "closed":
            return "skip" if record.state == "open" else "call"
        return "probe" if record.allows_calls(time.time() if now is None else now) else "skip"

    def allows(self, dependency: str, now: float | None = None) -> bool:
        return self.admission(dependency, now) != "skip"

    def apply(self, key: str, value: bytes | None, revision: int = 0) -> None:
        if value is None:
            self.records.pop(key, None)
            self.seen.pop(key, None)
            return
        record = _decode(value)
        self.records[key] = record
        if self.seen.get(key, ("", False, 0.0))[:2] != (record.state, record.forced):
            self.seen[key] = (record.state, record.forced, time.time())

    def snapshot(self) -> dict[str, dict[str, object]]:
        """What this replica believes, for its $SRV.STATS: state and when it saw it."""
        return {dep: {"state": state, "forced": forced, "seen_at": seen_at}
                for dep, (state, forced, seen_at) in self.seen.items()}

    async def follow(self, kv: KeyValue, stop: anyio.Event) -> None:
        """Keep `records` up to date until `stop` is set."""
        await follow_bucket(kv, self.apply, stop, quarantine=self.quarantine)


class BreakerGate:
    """May this process call a dependency now? Closed: yes; open: no; half-open: if it gets a probe lease."""

    def __init__(self, view: BreakerView, acquire: AcquireLease) -> None:
        self.view = view
        self.acquire = acquire

    def admission(self, dependency: str) -> Admission:
        return self.view.admission(dependency)

    async def permits(self, dependency: str, call_id: str) -> bool:
        admission = self.view.admission(dependency)
        if admission == "probe":
            return await self.acquire(dependency, call_id)
        return admission == "call"


def lease_requester(nc, holder: str) -> AcquireLease:
    """Ask the breaker service for a probe lease; no answer counts as no lease (the circuit stays shut)."""

    async def acquire(dependency: str, call_id: str) -> bool:
        request = AcquireProbe(dependency=dependency, call_id=call_id, holder=holder)
        try:
            reply = await nc.request(subjects.BREAKER_PROBE, msgspec.json.encode(request),
                                     timeout=PROBE_REQUEST_TIMEOUT_S)
            return _grant(reply.data).granted
        except (NatsTimeout, NoRespondersError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("no probe lease for %s (breaker did not answer: %r); not calling it", dependency, exc)
            return False

    return acquire
