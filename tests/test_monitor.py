"""The monitor's figures, no server: windows, scopes, sketches, breaker times, Corral's own clock."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import msgspec
import pytest

from contracts import BreakerChanged, StepCompleted, StepFailed, TaskCompleted, TaskFailed, TaskSpec, TaskValidated
from contracts.events import TokenEstimate, Usage
from contracts.policy import DEFAULT_POLICY, AlertRule, Policy, Price
from services.monitor.alerts import (
    AlertBook, Pending, above_at, evaluate, missed_change, observe, policy_changed, should_roll_back)
from services.monitor.figures import Bucket
from services.monitor.handlers import Metrics

NOW = 1_800_000_000.0  # a fixed "now" (Unix seconds) the figures are read at
PRICED = Policy(prices={"m-1": Price(input=1.0, output=2.0)})


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def metrics(policy: Policy = DEFAULT_POLICY, **options) -> Metrics:
    return Metrics(lambda: policy, clock=Clock(), **options)


def stamp(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def validated(n: int, tenant: str = "t1", agent: str = "research") -> TaskValidated:
    return TaskValidated(task_id=f"task-{n}", tenant=tenant, user="u", spec=TaskSpec(agent=agent, prompt="p"),
                         estimate=TokenEstimate(prompt_tokens=1, max_output_tokens=1))


def completed(n: int, received: float, tenant: str = "t1", model: str = "m-1", **fields) -> TaskCompleted:
    return TaskCompleted(task_id=f"task-{n}", tenant=tenant, user="u", output="o", attempts=1, model=model,
                         usage=Usage(input_tokens=1, output_tokens=1), received_at=stamp(received), **fields)


def failed(n: int, received: float, tenant: str = "t1") -> TaskFailed:
    return TaskFailed(task_id=f"task-{n}", tenant=tenant, user="u", reason="attempts_exhausted", error="e",
                      attempts=[], received_at=stamp(received))


def step(n: int, tokens: int = 10, model: str = "m-1", tenant: str = "t1", agent: str = "research") -> StepCompleted:
    return StepCompleted(task_id=f"task-{n}", tenant=tenant, user="u", step_id=f"task-{n}:1", attempt=1,
                         agent=agent, dependency=f"simulated/{model}", model=model, output="o",
                         usage=Usage(input_tokens=tokens, output_tokens=0), latency_ms=1.0)


def step_failed(n: int, model: str = "m-1") -> StepFailed:
    return StepFailed(task_id=f"task-{n}", tenant="t1", user="u", step_id=f"task-{n}:1", attempt=1,
                      agent="research", dependency=f"simulated/{model}", error="transient", message="down")


def fold(m: Metrics, *timed: tuple[object, float]) -> None:
    async def go():
        for event, at in timed:
            await m.on_event(event, at)
    anyio.run(go)


def test_three_tasks_stamped_in_the_year_2000_do_not_move_the_percentiles():
    ontime = metrics()
    fold(ontime, *[(completed(n, received=NOW - 1.0 - n / 10), NOW) for n in range(20)])
    backdated = metrics()
    fold(backdated, *[(completed(n, received=NOW - 1.0 - n / 10), NOW) for n in range(20)])
    long_ago = datetime(2000, 1, 1, tzinfo=UTC)
    fold(backdated, *[(completed(100 + n, received=NOW - 1.0, occurred_at=long_ago), NOW) for n in range(3)])
    before, after = ontime.window("all", "1m"), backdated.window("all", "1m")
    assert after.latency.count == before.latency.count + 3
    assert after.latency.p99_ms == pytest.approx(before.latency.p99_ms, rel=0.02)
    assert after.latency.p99_ms < 3_000


def test_latency_runs_from_the_receipt_to_the_end_as_the_stream_stamped_them():
    m = metrics()
    fold(m, (completed(1, received=NOW - 2.0), NOW - 0.5))
    assert m.window("all", "1m").latency.p50_ms == pytest.approx(1_500, rel=0.01)


def test_an_event_counts_in_the_windows_its_receipt_time_falls_in():
    m = metrics()
    fold(m, (completed(1, received=NOW - 121), NOW - 120), (completed(2, received=NOW - 11), NOW - 10),
         (completed(3, received=NOW - 3601), NOW - 3600))
    assert [m.window("all", w).tasks for w in ("1m", "5m", "1h")] == [1, 2, 2]


def test_error_rates_count_tasks_and_steps_apart():
    m = metrics()
    fold(m, (completed(1, NOW - 1), NOW), (failed(2, NOW - 1), NOW), (failed(3, NOW - 1), NOW),
         (failed(4, NOW - 1), NOW), (step(1), NOW), (step_failed(2), NOW))
    window = m.window("all", "5m")
    assert (window.tasks, window.error_rate) == (4, 0.75)
    assert (window.steps, window.step_error_rate) == (2, 0.5)


def test_tokens_per_hour_and_cost_per_task_come_from_the_window():
    m = metrics(PRICED)
    fold(m, (step(1, tokens=1000), NOW - 30), (step(2, tokens=500), NOW - 30), (completed(1, NOW - 31), NOW - 30),
         (completed(2, NOW - 31), NOW - 30))
    minute, hour = m.window("all", "1m"), m.window("all", "1h")
    assert (minute.tokens, minute.tokens_per_hour) == (1500, 1500 * 60)
    assert hour.tokens_per_hour == 1500
    assert hour.cost_usd == pytest.approx(1.5) and hour.cost_per_task_usd == pytest.approx(0.75)


def test_each_tenant_agent_kind_and_model_has_figures_of_its_own():
    m = metrics()
    fold(m, (validated(1, tenant="a", agent="coding"), NOW), (completed(1, NOW - 1, tenant="a", model="m-2"), NOW),
         (validated(2, tenant="b", agent="research"), NOW), (failed(2, NOW - 1, tenant="b"), NOW))
    assert {name: (m.window(name, "1m").tasks, m.window(name, "1m").error_rate)
            for name in m.scopes.names()} == {
        "all": (2, 0.5), "tenant:a": (1, 0.0), "agent:coding": (1, 0.0), "model:m-2": (1, 0.0),
        "tenant:b": (1, 1.0), "agent:research": (1, 1.0)}


def test_tenants_past_the_scope_limit_are_counted_together_as_other():
    m = metrics(max_scopes=4)
    fold(m, *[(completed(n, NOW - 1, tenant=f"tenant-{n}", model="m"), NOW) for n in range(10)])
    names = m.scopes.names()
    assert names == ["all", "tenant:tenant-0", "model:m", "tenant:tenant-1", "tenant:other"]
    assert m.window("tenant:other", "1m").tasks == 8
    assert m.window("all", "1m").tasks == 10


def test_two_replicas_windows_merge_into_exactly_what_one_monitor_saw_of_all():
    one, left, right = metrics(), metrics(), metrics()
    timed = [(completed(n, received=NOW - 50 - (n % 17) * 0.37), NOW - 40 + n % 30) for n in range(200)]
    fold(one, *timed)
    fold(left, *timed[::2])
    fold(right, *timed[1::2])
    merged = Bucket()
    merged.merge(left.scopes.by_name["all"].window(NOW, "5m"))
    merged.merge(right.scopes.by_name["all"].window(NOW, "5m"))
    whole = one.scopes.by_name["all"].window(NOW, "5m")
    assert merged.tasks_ok == whole.tasks_ok == 200
    assert [merged.latency.quantile(q) for q in (0.5, 0.95, 0.99)] == \
        [whole.latency.quantile(q) for q in (0.5, 0.95, 0.99)]


def test_a_breaker_open_time_is_counted_from_its_opening_to_its_closing():
    m = metrics()
    change = dict(dependency="simulated/m-1", consecutive_failures=5)
    fold(m, (BreakerChanged(previous="closed", state="open", **change), NOW - 600),
         (BreakerChanged(previous="open", state="half_open", **change), NOW - 570),
         (BreakerChanged(previous="half_open", state="closed", **change), NOW - 500),
         (BreakerChanged(previous="closed", state="open", **change), NOW - 60))
    (times,) = m.report().breaker_times
    assert (times.state, times.open_for_s, times.open_total_s) == ("open", 60.0, 160.0)


# --- alert rules -------------------------------------------------------------------------------------------


ERRORS = AlertRule(name="errors", figure="error_rate", above=0.2, resolve_at=0.1, for_s=10, severity="critical",
                   auto_rollback=True)


def run_rule(book: AlertBook, value: float, at: float, pending: Pending, rule: AlertRule = ERRORS):
    return evaluate(book, [rule], {rule.name: {"all": value}}, pending, at, policy_version=3)


def test_an_alert_fires_once_its_figure_stayed_above_the_threshold_for_its_duration_and_only_once():
    pending, book = Pending(), AlertBook()
    book, first = run_rule(book, 0.5, NOW, pending)
    book, second = run_rule(book, 0.5, NOW + 10, pending)
    book, third = run_rule(book, 0.9, NOW + 20, pending)
    assert (first.fired, third.fired) == ([], [])
    [(rule, alert)] = second.fired
    assert (alert.rule, alert.scope, alert.severity, alert.value, alert.policy_version) == ("errors", "all",
                                                                                            "critical", 0.5, 3)
    assert list(book.firing) == ["errors|all"] and len(book.history) == 1


def test_a_firing_alert_resolves_only_at_its_resolve_threshold():
    pending, book = Pending(), AlertBook()
    book, _ = run_rule(book, 0.5, NOW, pending)
    book, _ = run_rule(book, 0.5, NOW + 10, pending)
    book, hovering = run_rule(book, 0.15, NOW + 20, pending)  # below the threshold, above the resolve threshold
    book, settled = run_rule(book, 0.05, NOW + 30, pending)
    assert hovering.resolved == []
    [resolved] = settled.resolved
    assert (resolved.value, resolved.threshold, book.firing) == (0.05, 0.1, {})


def test_a_dip_below_the_threshold_restarts_the_for_duration():
    pending, book = Pending(), AlertBook()
    book, _ = run_rule(book, 0.5, NOW, pending)
    book, _ = run_rule(book, 0.1, NOW + 5, pending)
    book, early = run_rule(book, 0.5, NOW + 10, pending)
    book, late = run_rule(book, 0.5, NOW + 20, pending)
    assert early.fired == [] and len(late.fired) == 1


def test_a_silenced_rule_does_not_fire_until_its_silence_ends():
    pending = Pending()
    book = AlertBook(silences={"errors": NOW + 100})
    book, _ = run_rule(book, 0.5, NOW, pending)
    book, silenced = run_rule(book, 0.5, NOW + 50, pending)
    book, after = run_rule(book, 0.5, NOW + 101, pending)
    assert silenced.fired == [] and len(after.fired) == 1


def test_a_critical_alert_new_since_a_recent_policy_change_rolls_it_back_and_an_older_one_does_not():
    pending = Pending()
    book = policy_changed(AlertBook(), version=7, previous=6, now=NOW)
    book, done = run_rule(book, 0.5, NOW + 1, pending, msgspec.structs.replace(ERRORS, for_s=0))
    [(rule, alert)] = done.fired
    assert should_roll_back(book, rule, alert, NOW + 1, window_s=600)
    assert not should_roll_back(book, rule, alert, NOW + 601, window_s=600)  # too long after the change
    assert not should_roll_back(book, msgspec.structs.replace(rule, auto_rollback=False), alert, NOW + 1, window_s=600)
    firing_before = policy_changed(book, version=8, previous=7, now=NOW + 2)  # it fired before the next change
    assert not should_roll_back(firing_before, rule, alert, NOW + 3, window_s=600)


def test_the_alert_rule_example_in_the_monitoring_doc_is_a_valid_policy():
    import re
    import tomllib
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "monitoring.md").read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    policy = msgspec.convert(tomllib.loads(example), Policy)
    assert [rule.name for rule in policy.alerting.rules] == ["acme_latency"]
    assert policy.alerting.rules[0].resolve_threshold == 1500


def test_an_alert_rule_whose_resolve_threshold_is_above_its_threshold_is_refused():
    with pytest.raises(ValueError, match="resolve_at"):
        AlertRule(name="bad", figure="error_rate", above=0.1, resolve_at=0.2)


def test_an_event_that_lands_in_an_older_bucket_after_a_report_is_counted_in_the_next():
    m = metrics()
    fold(m, (completed(1, NOW - 31), NOW - 30))
    assert m.window("all", "1m").tasks == 1
    fold(m, (completed(2, NOW - 31), NOW - 30), (completed(3, NOW - 1), NOW))
    assert m.window("all", "1m").tasks == 3
    assert m.window("all", "1m", now=NOW + 60).tasks == 0


def test_a_rule_is_observed_in_each_instance_of_its_scope_and_a_window_with_too_few_tasks_says_nothing():
    from services.monitor.alerts import observe

    m = metrics()
    fold(m, (failed(1, NOW - 1, tenant="a"), NOW), (completed(2, NOW - 1, tenant="b"), NOW),
         (completed(3, NOW - 1, tenant="b"), NOW),
         (BreakerChanged(dependency="simulated/m-1", previous="closed", state="open", consecutive_failures=5),
          NOW - 400))
    m.queue_depth.update({"guard": 120, "budget-admit": 3})
    per_tenant = AlertRule(name="t", figure="error_rate", above=0.1, scope="tenant", window="1m")
    busy_only = msgspec.structs.replace(per_tenant, min_tasks=2)
    assert observe(m, per_tenant, NOW) == {"tenant:a": 1.0, "tenant:b": 0.0}
    assert observe(m, busy_only, NOW) == {"tenant:b": 0.0}
    assert observe(m, msgspec.structs.replace(per_tenant, scope="global"), NOW) == {"all": 1 / 3}
    assert observe(m, AlertRule(name="b", figure="breaker_open_s", above=300), NOW) == {
        "dependency:simulated/m-1": 400.0}
    assert observe(m, AlertRule(name="q", figure="queue_depth", above=100), NOW) == {
        "consumer:guard": 120.0, "consumer:budget-admit": 3.0}


def admitted(n: int, tokens: int, tenant: str = "t1"):
    from contracts import TaskAdmitted

    return TaskAdmitted(task_id=f"task-{n}", tenant=tenant, user="u", spec=TaskSpec(agent="research", prompt="p"),
                        estimate=TokenEstimate(prompt_tokens=1, max_output_tokens=1), reserved_tokens=tokens,
                        window="2026-12-02T04")


def test_a_tenants_reserved_tokens_are_held_from_admission_to_the_tasks_end():
    m = metrics()
    fold(m, (admitted(1, 300), NOW), (admitted(2, 200), NOW), (admitted(3, 50, tenant="t2"), NOW))
    held = m.report().reserved_tokens
    fold(m, (completed(1, NOW - 1), NOW))
    assert (held, m.report().reserved_tokens) == ({"t1": 500, "t2": 50}, {"t1": 200, "t2": 50})


def test_a_snapshot_restores_into_the_same_figures():
    from services.monitor.snapshot import Head, Part, Snapshot, capture, restore

    m = metrics(PRICED)
    fold(m, (validated(1, agent="coding"), NOW - 100), (admitted(2, 70), NOW - 90), (step(1), NOW - 80),
         (completed(1, NOW - 81), NOW - 80), (failed(3, NOW - 5), NOW - 4),
         (BreakerChanged(dependency="simulated/m-1", previous="closed", state="open", consecutive_failures=5),
          NOW - 30))
    taken = capture(m, "w.1", NOW)
    wire = Snapshot(head=msgspec.msgpack.decode(msgspec.msgpack.encode(taken.head), type=Head),
                    parts=[msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=Part) for p in taken.parts])
    again = metrics(PRICED)
    restore(again, wire)
    before, after = m.report(), again.report()
    assert msgspec.structs.replace(after, uptime_s=0) == msgspec.structs.replace(before, uptime_s=0)
    assert after.scopes[0].windows["1h"].tasks == 2 and after.reserved_tokens == {"t1": 70}
    assert again.agents == m.agents


def test_many_open_tasks_are_snapshotted_in_keys_that_each_fit_in_a_message():
    from services.monitor.snapshot import OPEN_PER_KEY, OpenTasks, capture

    m = metrics()
    fold(m, *[(validated(n), NOW) for n in range(OPEN_PER_KEY * 2 + 1)])
    fold(m, *[(admitted(n, 10), NOW) for n in range(OPEN_PER_KEY + 1)])
    parts = [p for p in capture(m, "w.1", NOW).parts if isinstance(p, OpenTasks)]
    assert [len(p.agents) for p in parts] == [OPEN_PER_KEY, OPEN_PER_KEY, 1]
    assert sum(len(p.reserved) for p in parts) == OPEN_PER_KEY + 1
    assert max(len(msgspec.msgpack.encode(p)) for p in parts) < 1024 * 1024


def test_a_task_the_budget_rejects_after_validation_is_forgotten():
    from contracts import TaskRejected

    m = metrics()
    fold(m, (validated(1), NOW), (TaskRejected(task_id="task-1", tenant="t1", user="u", reason="over_budget",
                                               message="no", stage="budget"), NOW))
    assert not m.agents


def test_a_change_made_while_no_monitor_ran_is_judged_by_what_was_above_a_threshold_just_before_it():
    rule = AlertRule(name="errors", figure="error_rate", above=0.5, resolve_at=0.2, window="1m", severity="critical",
                     auto_rollback=True)
    change, now = NOW - 30, NOW  # the policy changed 30 s before this monitor started

    def judged(*timed) -> tuple[set[str], bool]:
        m = metrics()
        fold(m, *timed)
        above = above_at(m, rule, change, now)
        book = missed_change(AlertBook(), version=5, previous=4, at=change, above=above)
        book, done = evaluate(book, [rule], {rule.name: observe(m, rule, now)}, Pending(), now, 5)
        return above, any(should_roll_back(book, r, alert, now, window_s=600) for r, alert in done.fired)

    fine_before = [(completed(n, change - 40), change - 20) for n in range(3)]
    failing_after = [(failed(n, change), change + 10) for n in range(3, 9)]
    assert judged(*fine_before, *failing_after) == (set(), True)
    failing_before = [(failed(n, change - 40), change - 20) for n in range(3)]
    assert judged(*failing_before, *failing_after) == ({"errors|all"}, False)


def test_a_missed_change_whose_window_the_rings_no_longer_hold_counts_what_is_above_now_as_above_then():
    rule = AlertRule(name="errors", figure="error_rate", above=0.5, window="5m", severity="critical",
                     auto_rollback=True)
    m = metrics()
    fold(m, *[(failed(n, NOW - 10), NOW - 5) for n in range(3)])
    assert above_at(m, rule, NOW - 30, NOW) == set()  # 27 of the window's 30 buckets before the change are held
    assert above_at(m, rule, NOW - 250, NOW) == {"errors|all"}  # 5 of 30: too few to tell
