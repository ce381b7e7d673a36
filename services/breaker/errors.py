"""Failures of the breaker service."""

from shared.errors import CorralError


class BreakerError(CorralError):
    """Base of breaker errors."""
