"""The budget ledger's arithmetic, without a server."""

from datetime import UTC, datetime

import pytest

from contracts import Usage
from contracts.policy import BudgetLimits, Price
from contracts.queries import StepCost
from services.budget import ledger
from services.budget.ledger import Account

LIMITS = BudgetLimits(daily_tokens=10_000, hourly_tokens=1_000)
NOON = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def reserve(account: Account, task_id: str, amount: int, now: datetime = NOON, limits: BudgetLimits = LIMITS):
    return ledger.reserve(account, task_id, amount, limits, now, scope="user")


def post(account: Account, task_id: str, step_id: str, tokens: int, now: datetime = NOON, cost: float = 0.0):
    return ledger.post(account, task_id, step_id, tokens, cost, LIMITS, now, thresholds=True)


def test_a_reservation_is_made_only_if_it_fits_every_window():
    account = Account()
    assert reserve(account, "t1", 600) is None
    refusal = reserve(account, "t2", 500)
    assert refusal is not None
    assert (refusal.window, refusal.limit, refusal.remaining) == ("hour", 1_000, 400)
    assert refusal.resets_at == datetime(2026, 11, 27, 13, 0, tzinfo=UTC)
    assert reserve(account, "t3", 400) is None
    assert account.remaining("hour", LIMITS) == 0 and account.remaining("day", LIMITS) == 9_000


def test_the_daily_window_refuses_with_midnight_utc_as_its_reset():
    account = Account()
    account.day = ledger.Window(start="2026-11-27", used=9_800)
    refusal = reserve(account, "t1", 300)
    assert (refusal.window, refusal.remaining) == ("day", 200)
    assert refusal.resets_at == datetime(2026, 11, 28, tzinfo=UTC)


def test_reserving_the_same_task_twice_holds_one_reservation():
    account = Account()
    assert reserve(account, "t1", 600) is None
    assert reserve(account, "t1", 600) is None
    assert account.reserved == 600


def test_a_step_is_posted_once_and_shrinks_its_tasks_reservation():
    account = Account()
    reserve(account, "t1", 600)
    assert post(account, "t1", "t1-a1", 250) is not None
    assert post(account, "t1", "t1-a1", 250) is None
    assert (account.day.used, account.hour.used, account.reserved) == (250, 250, 350)


def test_a_steps_cost_waits_in_the_hold_with_its_tokens_beyond_the_reservation_until_the_release():
    account = Account()
    reserve(account, "t1", 100)
    charge = StepCost(step_id="t1-a1", model="m", usage=Usage(input_tokens=100, output_tokens=200), cost_usd=0.01)
    ledger.post(account, "t1", "t1-a1", 300, 0.01, LIMITS, NOON, thresholds=True, charge=charge)
    ledger.post(account, "t1", "t1-a1", 300, 0.01, LIMITS, NOON, thresholds=True, charge=charge)  # again: once
    ledger.close(account, "t1")
    assert [(c.step_id, c.over_reservation) for c in account.holds["t1"].costs] == [("t1-a1", 200)]
    assert account.holds["t1"].posted_tokens == 300
    assert ledger.expire(account, NOON.timestamp() + 1) == {}  # closed already: nothing to expire


def test_usage_above_the_reservation_is_posted_and_flagged():
    account = Account()
    reserve(account, "t1", 100)
    posted = post(account, "t1", "t1-a1", 300)
    assert posted.over_reservation == 200
    assert (account.day.used, account.reserved) == (300, 0)


def test_closing_a_hold_frees_what_it_did_not_use_and_it_goes_only_once_the_journal_has_its_steps():
    account = Account()
    reserve(account, "t1", 600)
    post(account, "t1", "t1-a1", 100)
    assert ledger.close(account, "t1") == {"t1-a1": 0}
    assert account.remaining("hour", LIMITS) == 900
    assert not ledger.settle(account, "t1", journaled=set())
    assert ledger.settle(account, "t1", journaled={"t1-a1"})
    assert account.holds == {}


def test_a_step_posted_after_its_task_ended_is_billed_and_kept_in_a_closed_hold():
    account = Account()
    reserve(account, "t1", 600)
    ledger.close(account, "t1")
    ledger.settle(account, "t1", journaled=set())
    assert post(account, "t1", "t1-a2", 50).over_reservation == 0
    assert account.holds["t1"].closed and account.reserved == 0
    assert post(account, "t1", "t1-a2", 50) is None
    assert account.day.used == 50


def test_an_undone_reservation_returns_everything_it_held():
    account = Account()
    reserve(account, "t1", 600)
    ledger.unreserve(account, "t1")
    assert account.remaining("hour", LIMITS) == 1_000 and account.holds == {}


def test_the_hourly_window_resets_at_the_hour_and_the_daily_one_at_midnight_utc():
    account = Account()
    reserve(account, "t1", 500, now=datetime(2026, 11, 27, 13, 59, 59, tzinfo=UTC))
    post(account, "t1", "t1-a1", 500, now=datetime(2026, 11, 27, 13, 59, 59, tzinfo=UTC))
    ledger.roll(account, datetime(2026, 11, 27, 14, 0, 0, tzinfo=UTC))
    assert (account.hour.start, account.hour.used) == ("2026-11-27T14", 0)
    assert (account.day.start, account.day.used) == ("2026-11-27", 500)
    ledger.roll(account, datetime(2026, 11, 28, 0, 0, 0, tzinfo=UTC))
    assert (account.day.start, account.day.used) == ("2026-11-28", 0)


def test_a_window_never_rolls_back_to_an_earlier_hour():
    account = Account()
    post(account, "t1", "t1-a1", 10, now=datetime(2026, 11, 27, 14, 0, 1, tzinfo=UTC))
    ledger.roll(account, datetime(2026, 11, 27, 13, 59, 59, tzinfo=UTC))  # a replica whose clock is behind
    assert (account.hour.start, account.hour.used) == ("2026-11-27T14", 10)


def test_each_threshold_is_crossed_once_per_window_and_due_until_notified():
    account = Account()
    for n, tokens in enumerate((400, 200, 150, 300)):  # hourly: 40 %, 60 %, 75 %, 105 %
        post(account, "t1", f"t1-a{n}", tokens)
    due = ledger.due_notices(account)
    assert [(d.window, d.threshold_pct) for d in due] == [("hour", 50), ("hour", 80), ("hour", 100)]
    ledger.mark_notified(account, due)
    post(account, "t1", "t1-a9", 100)
    assert ledger.due_notices(account) == []
    ledger.roll(account, datetime(2026, 11, 27, 13, 0, tzinfo=UTC))
    post(account, "t2", "t2-a1", 600, now=datetime(2026, 11, 27, 13, 0, tzinfo=UTC))
    assert [(d.window, d.start, d.threshold_pct) for d in ledger.due_notices(account)] == [("hour", "2026-11-27T13", 50)]


def test_a_hold_older_than_the_timeout_expires_and_a_newer_one_does_not():
    account = Account()
    reserve(account, "old", 300, now=datetime(2026, 11, 27, 11, 0, tzinfo=UTC))
    reserve(account, "new", 300, now=datetime(2026, 11, 27, 11, 50, tzinfo=UTC))
    cutoff = datetime(2026, 11, 27, 11, 45, tzinfo=UTC).timestamp()
    assert ledger.expire(account, cutoff) == {"old": []}
    assert account.reserved == 300 and account.holds["old"].closed


@pytest.mark.parametrize(("usage", "expected"), [
    (Usage(input_tokens=1000, output_tokens=0), 0.003),
    (Usage(input_tokens=0, output_tokens=1000), 0.015),
    (Usage(input_tokens=1000, output_tokens=1000, cached_tokens=1000), 0.0015 + 0.015),
])
def test_a_price_counts_fresh_input_cached_input_and_output_at_their_own_rates(usage, expected):
    assert Price(input=0.003, output=0.015, cached=0.0015).cost(usage) == pytest.approx(expected)
