"""What the live views show, from successive monitor reports (services/dashboard/samples.py): rates between
reports, a monitor restart that does not show as negative rates, an hour kept, alerts and approvals only
when the report carries them."""

from __future__ import annotations

import msgspec

from contracts.queries import Percentiles, ScopeReport, StatusReport, WindowFigures
from services.dashboard.samples import HOUR_S, History


def report(done: int, cost: float = 0.0, steps: int = 0, **extra) -> StatusReport:
    return StatusReport(counts={"task.completed": done, "step.completed": steps}, latency=Percentiles(),
                        error_rate=0.0, step_error_rate=0.0, tokens_last_hour=0, cost_usd=cost,
                        cost_per_task_usd=0.0, queue_depth={}, breakers={}, uptime_s=0.0, **extra)


def test_throughput_is_tasks_per_second_over_the_last_ten_seconds_of_reports():
    history = History()
    assert history.add(report(0), at=100.0).tasks_per_s == 0.0  # alone: no rate yet
    history.add(report(10, steps=20), at=101.0)
    assert history.add(report(40, steps=60), at=105.0).tasks_per_s == 8.0  # 40 tasks in 5 s
    assert history.add(report(40, steps=60), at=120.0).tasks_per_s == 0.0  # the 10 s before: nothing new


def test_cost_per_hour_is_the_cost_over_the_hour_watched_scaled_to_an_hour():
    history = History()
    history.add(report(0, cost=1.0), at=0.0)
    assert history.add(report(5, cost=1.5), at=1800.0).cost_per_hour_usd == 1.0


def test_a_monitor_restart_starts_the_rates_afresh_instead_of_showing_them_negative():
    history = History()
    history.add(report(500, cost=5.0), at=0.0)
    history.add(report(600, cost=6.0), at=5.0)
    after = history.add(report(3, cost=0.01), at=6.0)
    assert after.tasks_per_s == 0.0 and after.cost_per_hour_usd == 0.0
    assert history.add(report(13, cost=0.01), at=11.0).tasks_per_s == 2.0


def test_the_history_keeps_one_hour_of_samples():
    history = History()
    for second in range(0, 2 * int(HOUR_S), 10):
        history.add(report(second), at=float(second))
    assert history.samples[-1].at - history.samples[0].at <= HOUR_S
    assert len(history.samples) == int(HOUR_S) // 10 + 1


def test_alerts_and_approvals_show_only_when_the_report_carries_them():
    plain = History().add(report(1), at=0.0)
    assert plain.alerts is None and plain.approvals_waiting is None

    class WithAlerts(StatusReport, frozen=True, kw_only=True):  # a report as a monitor with alerts sends it
        alerts: list[dict] = []
        approvals_waiting: int = 0

    sent = WithAlerts(**msgspec.structs.asdict(report(1)), alerts=[{"name": "p95_latency", "severity": "high"}],
                      approvals_waiting=2)
    sample = History().add(sent, at=0.0)
    assert sample.alerts == [{"name": "p95_latency", "severity": "high"}] and sample.approvals_waiting == 2


def test_alerts_and_approvals_asked_elsewhere_are_shown_beside_the_report():
    sample = History().add(report(1), at=0.0, alerts=[{"rule": "error_rate", "severity": "critical",
                                                        "scope": "all"}], approvals_waiting=0)
    assert sample.alerts == [{"rule": "error_rate", "severity": "critical", "scope": "all"}]
    assert sample.approvals_waiting == 0


def scope(name: str, tasks_1h: int, p95_ms: float = 0.0) -> ScopeReport:
    figures = {"1m": WindowFigures(tasks=min(tasks_1h, 1)), "5m": WindowFigures(tasks=tasks_1h, error_rate=0.25,
                                                                              latency=Percentiles(p95_ms=p95_ms)),
               "1h": WindowFigures(tasks=tasks_1h, tokens_per_hour=1234.0, cost_per_task_usd=0.0012)}
    return ScopeReport(scope=name, windows=figures)


def test_a_sample_shows_the_five_busiest_tenants_of_the_hour_and_no_other_scope():
    scopes = [scope("all", 100), scope("agent:research", 90), *[scope(f"tenant:t{n}", n) for n in range(8)]]
    sample = History().add(report(0, scopes=scopes), at=0.0)
    assert [line.scope for line in sample.tenants] == ["tenant:t7", "tenant:t6", "tenant:t5", "tenant:t4", "tenant:t3"]
    assert sample.tenants[0].tasks == {"1m": 1, "5m": 7, "1h": 7}


def test_corral_status_and_top_draw_each_scope_on_one_line_of_its_windows():
    from rich.console import Console

    from services.cli.tasks import print_status
    from services.cli.top import frame

    scopes = [scope("all", 3, p95_ms=812.4), scope("tenant:acme", 3, p95_ms=812.4)]
    out = Console(width=160, record=True)
    print_status(report(3, scopes=scopes), out)
    out.print(frame(History().add(report(3, scopes=scopes), at=0.0)))
    lines = [line for line in out.export_text().splitlines() if "tenant:acme" in line]
    assert len(lines) == 2  # in the status's table of scopes, and in top's busiest tenants
    for line in lines:
        assert [cell.strip() for cell in line.split("│")[1:-1]] == [
            "tenant:acme", "1 / 3 / 3", "812", "25.0%", "1,234", "$0.00120"]
