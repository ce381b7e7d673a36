"""The budget ledger's arithmetic, without a server."""

from datetime import UTC, datetime

from services.budget.ledger import Ledger, day_window, next_day, post, release, reserve


def test_a_reservation_is_made_only_if_it_fits_what_remains():
    ledger = Ledger()
    assert reserve(ledger, "t1", 600, limit=1000)
    assert not reserve(ledger, "t2", 500, limit=1000)
    assert reserve(ledger, "t3", 400, limit=1000)
    assert ledger.remaining(1000) == 0


def test_reserving_the_same_task_twice_holds_one_reservation():
    ledger = Ledger()
    assert reserve(ledger, "t1", 600, limit=1000)
    assert reserve(ledger, "t1", 600, limit=1000)
    assert ledger.outstanding == 600


def test_a_step_is_billed_once_and_shrinks_its_tasks_reservation():
    ledger = Ledger()
    reserve(ledger, "t1", 600, limit=1000)
    assert post(ledger, "t1", "t1-a1", 250)
    assert not post(ledger, "t1", "t1-a1", 250)
    assert (ledger.committed, ledger.reserved["t1"]) == (250, 350)


def test_release_returns_the_unused_reservation_and_a_released_task_cannot_reserve_again():
    ledger = Ledger()
    reserve(ledger, "t1", 600, limit=1000)
    post(ledger, "t1", "t1-a1", 100)
    assert release(ledger, "t1")
    assert ledger.remaining(1000) == 900
    assert reserve(ledger, "t1", 600, limit=1000)  # recognised: no new reservation
    assert ledger.outstanding == 0


def test_usage_above_the_reservation_is_still_billed():
    ledger = Ledger()
    reserve(ledger, "t1", 100, limit=1000)
    post(ledger, "t1", "t1-a1", 300)
    assert (ledger.committed, ledger.reserved["t1"]) == (300, 0)


def test_windows_are_utc_calendar_days():
    late = datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC)
    assert day_window(late) == "20261127"
    assert next_day(late) == datetime(2026, 11, 28, tzinfo=UTC)
