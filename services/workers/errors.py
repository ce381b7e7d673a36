"""Failures of a model provider, each mapped to the contract's error class."""

from contracts.events import ErrorClass
from shared.errors import CorralError


class ProviderError(CorralError):
    """A model call failed; `error_class` tells the executor whether to retry."""

    error_class: ErrorClass = "transient"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TransientProviderError(ProviderError):
    error_class = "transient"


class PermanentProviderError(ProviderError):
    error_class = "permanent"


class ProviderTimeout(ProviderError):
    error_class = "timeout"


class ProviderRateLimited(ProviderError):
    error_class = "rate_limited"


class ToolError(CorralError):
    """A tool answered with an error (bad arguments, a refused host, an MCP tool's isError): the model is
    told, and the tool's dependency counts the call as a success, since it answered."""


class UnknownProvider(CorralError):
    """The step names a provider this worker does not have."""


class CircuitOpen(CorralError):
    """A dependency's circuit is open (or half-open with no probe lease for this call): it was not called."""

    def __init__(self, dependency: str) -> None:
        super().__init__(f"circuit for {dependency} is open: not called")
        self.dependency = dependency
