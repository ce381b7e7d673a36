"""The circuit breaker's state machine (resilience4j's semantics), no server: services/breaker/circuit.py."""

from __future__ import annotations

from contracts.policy import BreakerSettings
from contracts.state import BreakerRecord
from services.breaker import circuit

SEED = BreakerSettings()  # the defaults: the seed's 5 failures, 60 s


def calls(record: BreakerRecord, outcomes: str, rules: BreakerSettings, now: float = 100.0,
          latency_s: float = 0.01) -> None:
    """Record one call per letter: o ok, f failed, s slow ok, x slow failed."""
    for n, letter in enumerate(outcomes):
        slow = letter in "sx"
        circuit.record_call(record, failed=letter in "fx", latency_s=rules.slow_call_duration_s if slow else latency_s,
                            call_id=f"c{n}", rules=rules, now=now)


def opened(rules: BreakerSettings, now: float = 100.0) -> BreakerRecord:
    record = BreakerRecord(dependency="p/m")
    calls(record, "f" * max(rules.window_size, rules.minimum_calls), rules, now=now)
    assert record.state == "open"
    return record


def test_the_defaults_open_after_five_failures_in_a_row_and_refuse_calls_for_sixty_seconds_as_the_seed_did():
    record = BreakerRecord(dependency="p/m")
    calls(record, "ffffo", SEED)
    assert record.state == "closed" and record.consecutive_failures == 0
    calls(record, "ffff", SEED)
    assert record.state == "closed"  # four failures and a success in the window: 80%, not 100%
    calls(record, "f", SEED)
    assert (record.state, record.failure_rate, record.calls) == ("open", 100.0, 5)
    assert record.generation == 1 and "failure rate 100%" in record.reason
    assert record.cause_at == 100.0  # the tripping call's end (no start time given: when it was recorded)
    assert not record.allows_calls(now=159.9) and record.allows_calls(now=160.0)


def test_a_count_window_waits_for_the_minimum_calls_then_opens_at_the_failure_rate_threshold():
    rules = BreakerSettings(window_size=10, minimum_calls=4, failure_rate_threshold=50)
    record = BreakerRecord(dependency="p/m")
    calls(record, "fff", rules)
    assert record.state == "closed"  # 100% failed, but only three calls
    calls(record, "o", rules)
    assert (record.state, record.failure_rate, record.calls) == ("open", 75.0, 4)


def test_a_count_window_keeps_only_the_last_calls():
    rules = BreakerSettings(window_size=4, minimum_calls=4, failure_rate_threshold=80)
    record = BreakerRecord(dependency="p/m")
    calls(record, "fffooo", rules)
    assert (record.state, record.recent, record.failure_rate) == ("closed", "fooo", 25.0)


def test_a_time_window_counts_only_the_calls_of_its_last_seconds():
    rules = BreakerSettings(window_type="time", window_size=10, minimum_calls=3, failure_rate_threshold=60)
    record = BreakerRecord(dependency="p/m")
    calls(record, "ff", rules, now=100.0)
    calls(record, "o", rules, now=111.0)  # the two failures are 11 s old: out of the window
    assert (record.state, record.calls, record.failure_rate) == ("closed", 1, 0.0)
    calls(record, "ff", rules, now=112.5)
    assert (record.state, record.calls) == ("open", 3)
    assert record.failure_rate == 66.7


def test_slow_calls_open_the_circuit_at_the_slow_call_rate_even_when_they_succeed():
    rules = BreakerSettings(window_size=4, minimum_calls=4, slow_call_rate_threshold=50, slow_call_duration_s=2)
    record = BreakerRecord(dependency="p/m")
    calls(record, "oos", rules)
    assert record.state == "closed"
    calls(record, "s", rules)
    assert (record.state, record.failure_rate, record.slow_call_rate) == ("open", 0.0, 50.0)
    assert "slow-call rate 50%" in record.reason


def test_half_open_grants_only_the_permitted_probes_and_the_same_answer_to_the_same_call():
    rules = BreakerSettings(wait_in_open_s=10, permitted_calls_in_half_open=2)
    record = opened(rules)
    grant = lambda call_id, now=111.0: circuit.grant_probe(record, call_id=call_id, holder="h", rules=rules, now=now)
    assert grant("early", now=105.0) is False and record.state == "open"
    assert grant("p1") is True and record.state == "half_open"
    assert [grant("p2"), grant("p3"), grant("p1")] == [True, False, True]
    assert [lease.call_id for lease in record.leases] == ["p1", "p2"]


def test_half_open_closes_when_the_probes_succeed_and_reopens_when_they_fail():
    rules = BreakerSettings(wait_in_open_s=10, permitted_calls_in_half_open=2, failure_rate_threshold=50)
    for outcomes, final in (("oo", "closed"), ("of", "open")):
        record = opened(rules)
        for call_id in ("p1", "p2"):
            assert circuit.grant_probe(record, call_id=call_id, holder="h", rules=rules, now=111.0)
        for call_id, letter in zip(("p1", "p2"), outcomes):
            assert record.state == "half_open"
            circuit.record_call(record, failed=letter == "f", latency_s=0.01, call_id=call_id, rules=rules, now=112.0)
        assert record.state == final
        if final == "open":
            assert record.retry_at == 122.0 and record.failure_rate == 50.0
        else:
            assert record.recent == "" and record.consecutive_failures == 0


def test_in_half_open_an_outcome_of_a_call_without_a_lease_is_ignored():
    rules = BreakerSettings(wait_in_open_s=10)
    record = opened(rules)
    circuit.half_open_if_due(record, rules=rules, now=111.0)
    circuit.record_call(record, failed=True, latency_s=0.01, call_id="admitted-before-it-opened", rules=rules,
                        now=111.5)
    assert (record.state, record.probes) == ("half_open", "")


def test_a_probe_lease_whose_outcome_never_came_frees_its_slot_when_it_expires():
    rules = BreakerSettings(wait_in_open_s=10, probe_lease_s=5)
    record = opened(rules)
    assert circuit.grant_probe(record, call_id="lost", holder="dead-replica", rules=rules, now=111.0)
    assert not circuit.grant_probe(record, call_id="next", holder="h", rules=rules, now=115.9)
    assert circuit.grant_probe(record, call_id="next", holder="h", rules=rules, now=116.0)


def test_a_forced_state_holds_whatever_the_calls_until_an_operator_releases_it():
    rules = BreakerSettings(window_size=3, minimum_calls=3)
    record = BreakerRecord(dependency="p/m")
    circuit.force(record, action="force_open", operator="ops", now=100.0)
    assert (record.state, record.forced, record.reason) == ("open", True, "forced open by ops")
    calls(record, "ooo", rules, now=1e9)
    assert record.state == "open" and not record.allows_calls(now=1e9)
    assert not circuit.grant_probe(record, call_id="c", holder="h", rules=rules, now=1e9)
    circuit.force(record, action="force_closed", operator="ops", now=101.0)
    calls(record, "fff", rules)
    assert (record.state, record.failure_rate) == ("closed", 100.0)  # counted, visible, but held closed
    circuit.force(record, action="release", operator="ops", now=102.0)
    assert (record.state, record.forced, record.recent) == ("closed", False, "")
    assert record.generation == 3


def test_in_closed_a_straggler_begun_before_the_circuit_closed_does_not_count_against_it():
    rules = BreakerSettings(wait_in_open_s=10)
    record = opened(rules)
    assert circuit.grant_probe(record, call_id="probe", holder="h", rules=rules, now=111.0)
    circuit.record_call(record, failed=False, latency_s=0.1, call_id="probe", rules=rules, now=112.0)
    assert (record.state, record.changed_at) == ("closed", 112.0)
    for n in range(5):  # failures of calls made during the outage, handled after the probe closed it
        circuit.record_call(record, failed=True, latency_s=0.1, call_id=f"old{n}", rules=rules, now=112.5,
                            started_at=105.0)
    assert (record.state, record.recent) == ("closed", "")
    calls(record, "f", rules, now=113.0)  # a call with no start time still counts
    assert record.recent == "f"


def test_a_transition_names_when_its_cause_happened():
    rules = BreakerSettings(window_size=1, minimum_calls=1, wait_in_open_s=10)
    record = BreakerRecord(dependency="p/m")
    circuit.record_call(record, failed=True, latency_s=0.5, call_id="c", rules=rules, now=103.0, started_at=100.0)
    assert (record.state, record.cause_at) == ("open", 100.5)  # the call ended at 100.5; recorded at 103
    circuit.half_open_if_due(record, rules=rules, now=200.0)
    assert (record.state, record.cause_at) == ("half_open", 113.0)  # its wait ended at 113
