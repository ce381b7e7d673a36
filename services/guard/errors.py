"""Why the guard refuses a task; each carries the contract's reason code."""

from contracts.events import RejectReason
from shared.errors import CorralError


class GuardError(CorralError):
    """Base of the guard's refusals. The message tells the caller what to fix."""

    reason: RejectReason = "invalid_request"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidRequest(GuardError):
    reason = "invalid_request"


class PayloadTooLarge(GuardError):
    reason = "payload_too_large"


class UnknownTenant(GuardError):
    reason = "unknown_tenant"


class UnknownAgent(GuardError):
    reason = "unknown_agent"


class ToolForbidden(GuardError):
    reason = "tool_forbidden"


class OverBudget(GuardError):
    """The estimate can never fit: above the request cap or the caller's whole budget."""

    reason = "over_budget"


class RateLimited(GuardError):
    reason = "rate_limited"
