"""Failures of the budget ledger."""

from shared.errors import CorralError, TransientError


class BudgetError(CorralError):
    """Base of budget errors."""


class OverBudget(BudgetError):
    """The task's estimate does not fit what remains in the window."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LedgerContention(TransientError):
    """Too many concurrent writers on one ledger key; the message is retried later."""
