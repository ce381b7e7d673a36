"""Failures of the dashboard's HTTP server, each one answer with its status code."""

from shared.errors import CorralError


class DashboardError(CorralError):
    """Base of dashboard errors; `status` is the HTTP status the request is answered with."""

    status = 500


class BadRequest(DashboardError):
    """The request is not one this server reads: malformed, too large, or a query that does not validate."""

    status = 400


class NotFound(DashboardError):
    status = 404


class MethodNotAllowed(DashboardError):
    status = 405


class MonitorSilent(DashboardError):
    """The service a query goes to did not answer in time."""

    status = 504
