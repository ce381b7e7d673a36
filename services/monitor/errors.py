"""Failures of the monitor."""

from shared.errors import CorralError


class MonitorError(CorralError):
    """Base of monitor errors."""
