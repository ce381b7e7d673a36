"""Why the guard refuses a task; each carries the contract's reason code."""

from contracts.events import RejectReason
from shared.errors import CorralError


class GuardError(CorralError):
    """Base of the guard's refusals."""

    reason: RejectReason = "invalid_request"


class InvalidRequest(GuardError):
    reason = "invalid_request"


class PayloadTooLarge(GuardError):
    reason = "payload_too_large"


class UnknownTenant(GuardError):
    reason = "unknown_tenant"


class UnknownAgent(GuardError):
    reason = "unknown_agent"
