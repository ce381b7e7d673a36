"""Failures of the budget, as its callers see them."""

from shared.errors import CorralError


class BudgetError(CorralError):
    """Base of budget errors."""


class BudgetUnavailable(BudgetError):
    """No budget replica answered a query in time."""


class UnknownTask(BudgetError):
    """The budget has no record of the task (never submitted, or rejected before the budget saw it)."""
