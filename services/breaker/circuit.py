"""A circuit breaker with resilience4j's semantics, as pure functions over a BreakerRecord.

    closed ──failure or slow-call rate ≥ threshold, over ≥ minimum calls──▶ open
    open ──wait_in_open_s passed──▶ half_open (only `permitted_calls_in_half_open` probes, leased)
    half_open ──all probes settled: rates below the thresholds──▶ closed (fresh window)
    half_open ──all probes settled: a rate at or above its threshold──▶ open (a new wait)
    forced open / forced closed (operator) ──release──▶ closed (fresh window)

The window is count-based (the last `window_size` calls) or time-based (the calls
of the last `window_size` seconds, kept as one bucket per second). In half-open
only the outcomes of leased probes count; every outcome while open is ignored; and
in closed, a call that began before the circuit last changed (a straggler of the
outage, handled late by a concurrent consumer) does not count against the fresh
window. While forced, calls are recorded (operators see the rates) but the state holds.

Every transition increments `generation`; the caller compares it to know whether
to announce a BreakerChanged. No I/O here: the breaker service applies these
inside a KV compare-and-set.
"""

from __future__ import annotations

from contracts.commands import BreakerAction
from contracts.policy import BreakerSettings
from contracts.state import BreakerRecord, Bucket, Lease

OK, FAILED, SLOW_OK, SLOW_FAILED = "o", "f", "s", "x"


def record_call(record: BreakerRecord, *, failed: bool, latency_s: float, call_id: str, rules: BreakerSettings,
                now: float, started_at: float = 0.0) -> None:
    """Count one call's outcome (`started_at`: when the call began, 0 if unknown)."""
    if record.state == "closed" and not record.forced and started_at and started_at < record.changed_at:
        return  # admitted before the circuit closed: it speaks of the state before
    slow = latency_s >= rules.slow_call_duration_s
    ended_at = started_at + latency_s if started_at else now
    letter = (SLOW_FAILED if slow else FAILED) if failed else (SLOW_OK if slow else OK)
    record.consecutive_failures = record.consecutive_failures + 1 if failed else 0
    if record.forced or record.state == "closed":
        _push(record, letter, rules, now)
        calls, failures, slow_calls = _window_counts(record, rules, now)
        _set_rates(record, calls, failures, slow_calls)
        if not record.forced and calls >= _minimum_calls(rules) and _tripped(record, rules):
            _open(record, rules, now, f"{_rates_text(record, rules)} over the last {calls} calls", ended_at)
    elif record.state == "half_open":
        lease = next((lease for lease in record.leases if lease.call_id == call_id), None)
        if lease is None:
            return  # not a probe: a call admitted before the circuit opened
        record.leases.remove(lease)
        record.probes += letter
        _set_rates(record, *_counts(record.probes))
        if len(record.probes) >= rules.permitted_calls_in_half_open:
            settled = f"probes: {_rates_text(record, rules)} of {len(record.probes)}"
            if _tripped(record, rules):
                _open(record, rules, now, settled, ended_at)
            else:
                _close(record, now, settled, ended_at)


def half_open_if_due(record: BreakerRecord, *, rules: BreakerSettings, now: float) -> None:
    if not record.forced and record.state == "open" and now >= record.retry_at:
        _transition(record, "half_open", now,
                    f"{rules.wait_in_open_s:g} s open passed; {rules.permitted_calls_in_half_open} probe(s) allowed",
                    record.retry_at)
        record.leases, record.probes = [], ""


def expire_leases(record: BreakerRecord, *, now: float) -> None:
    """Free the slots of probes whose outcome never came (their holder died)."""
    record.leases = [lease for lease in record.leases if lease.expires_at > now]


def grant_probe(record: BreakerRecord, *, call_id: str, holder: str, rules: BreakerSettings, now: float) -> bool:
    """May `call_id` call the dependency now? In half-open: only while leases remain, across every replica;
    asking again for the same call gives the same answer."""
    half_open_if_due(record, rules=rules, now=now)
    if record.forced:
        return record.state != "open"
    if record.state != "half_open":
        return record.state == "closed"
    expire_leases(record, now=now)
    if any(lease.call_id == call_id for lease in record.leases):
        return True
    if len(record.leases) + len(record.probes) >= rules.permitted_calls_in_half_open:
        return False
    record.leases.append(Lease(call_id=call_id, holder=holder, expires_at=now + rules.probe_lease_s))
    return True


def force(record: BreakerRecord, *, action: BreakerAction, operator: str, now: float) -> None:
    """An operator's command: force open, force closed, or release to a fresh closed circuit."""
    who = operator or "an operator"
    if action == "release":
        if record.forced:
            record.forced, record.forced_by = False, ""
            _close(record, now, f"released by {who}")
        return
    state = "open" if action == "force_open" else "closed"
    if record.forced and record.state == state:
        return
    record.forced, record.forced_by = True, who
    _transition(record, state, now, f"forced {state} by {who}")
    record.leases, record.probes = [], ""
    if state == "open":
        record.opened_at = now


# --- windows and rates ------------------------------------------------------------


def _push(record: BreakerRecord, letter: str, rules: BreakerSettings, now: float) -> None:
    if rules.window_type == "count":
        record.buckets = []
        record.recent = (record.recent + letter)[-rules.window_size:]
        return
    record.recent = ""
    second = int(now)
    _drop_old_buckets(record, rules, now)
    if not record.buckets or record.buckets[-1].second != second:
        record.buckets.append(Bucket(second=second))
    bucket = record.buckets[-1]
    bucket.calls += 1
    bucket.failures += letter in (FAILED, SLOW_FAILED)
    bucket.slow += letter in (SLOW_OK, SLOW_FAILED)


def _drop_old_buckets(record: BreakerRecord, rules: BreakerSettings, now: float) -> None:
    oldest = int(now) - rules.window_size
    record.buckets = [bucket for bucket in record.buckets if bucket.second > oldest]


def _window_counts(record: BreakerRecord, rules: BreakerSettings, now: float) -> tuple[int, int, int]:
    if rules.window_type == "count":
        return _counts(record.recent)
    _drop_old_buckets(record, rules, now)
    return (sum(b.calls for b in record.buckets), sum(b.failures for b in record.buckets),
            sum(b.slow for b in record.buckets))


def _counts(letters: str) -> tuple[int, int, int]:
    """(calls, failures, slow calls) of a string of outcome letters."""
    failures = letters.count(FAILED) + letters.count(SLOW_FAILED)
    return len(letters), failures, letters.count(SLOW_OK) + letters.count(SLOW_FAILED)


def _set_rates(record: BreakerRecord, calls: int, failures: int, slow: int) -> None:
    record.calls = calls
    record.failure_rate = round(100.0 * failures / calls, 1) if calls else 0.0
    record.slow_call_rate = round(100.0 * slow / calls, 1) if calls else 0.0


def _minimum_calls(rules: BreakerSettings) -> int:
    # resilience4j: a count window smaller than the minimum makes the window the minimum.
    return min(rules.minimum_calls, rules.window_size) if rules.window_type == "count" else rules.minimum_calls


def _tripped(record: BreakerRecord, rules: BreakerSettings) -> bool:
    return (record.failure_rate >= rules.failure_rate_threshold
            or record.slow_call_rate >= rules.slow_call_rate_threshold)


def _rates_text(record: BreakerRecord, rules: BreakerSettings) -> str:
    slow = record.slow_call_rate >= rules.slow_call_rate_threshold
    if slow and record.failure_rate < rules.failure_rate_threshold:
        return f"slow-call rate {record.slow_call_rate:g}% (threshold {rules.slow_call_rate_threshold:g}%)"
    return f"failure rate {record.failure_rate:g}% (threshold {rules.failure_rate_threshold:g}%)"


# --- transitions -------------------------------------------------------------------


def _transition(record: BreakerRecord, state, now: float, reason: str, cause_at: float | None = None) -> None:
    record.state, record.changed_at, record.reason = state, now, reason
    record.cause_at = now if cause_at is None else cause_at
    record.generation += 1


def _open(record: BreakerRecord, rules: BreakerSettings, now: float, reason: str, cause_at: float) -> None:
    _transition(record, "open", now, reason, cause_at)
    record.opened_at, record.retry_at = now, now + rules.wait_in_open_s
    record.leases, record.probes = [], ""


def _close(record: BreakerRecord, now: float, reason: str, cause_at: float | None = None) -> None:
    _transition(record, "closed", now, reason, cause_at)
    record.recent, record.buckets, record.leases, record.probes = "", [], [], ""
    record.consecutive_failures = 0
