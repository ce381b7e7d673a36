"""Typed settings: defaults, then an optional TOML file, then CORRAL_* environment variables.

One struct for every service keeps one place to look; each field has a line of doc.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from shared.errors import ConfigError

ENV_PREFIX = "CORRAL_"
CONFIG_FILE_ENV = "CORRAL_CONFIG"


class AgentSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the executor runs one agent kind."""

    model: str
    """Model name the worker asks its provider for."""
    provider: str = "simulated"
    """Provider the worker calls; `simulated` is the built-in deterministic fake model."""
    default_output_tokens: int = 256
    """Expected output when a task gives no max_tokens (used for the estimate)."""


DEFAULT_AGENTS = {
    "research": AgentSettings(model="sim-large", default_output_tokens=384),
    "coding": AgentSettings(model="sim-large", default_output_tokens=512),
    "writing": AgentSettings(model="sim-small", default_output_tokens=256),
}

# Simulated prices, USD per 1,000 tokens (input, output). Named simulated: no real provider bills these.
DEFAULT_PRICES = {"sim-large": (0.003, 0.015), "sim-small": (0.00025, 0.00125)}


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a Corral process can be told. Env: CORRAL_<FIELD> (upper case)."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server or cluster to connect to (comma-separate several URLs)."""
    otlp_endpoint: str = ""
    """OTLP/HTTP collector base URL (e.g. http://localhost:4318); empty: no export.
    OTEL_EXPORTER_OTLP_ENDPOINT is honoured too."""
    stream_replicas: int = 1
    """Replicas of each stream and bucket: 1 on one server, 3 on a cluster."""

    tenants: list[str] = msgspec.field(default_factory=lambda: ["default", "acme", "globex", "initech"])
    """Tenants the guard accepts; a task from any other is rejected with unknown_tenant."""
    agents: dict[str, AgentSettings] = msgspec.field(default_factory=lambda: dict(DEFAULT_AGENTS))
    """Agent kinds the executor knows, with their model and provider."""
    prices: dict[str, tuple[float, float]] = msgspec.field(default_factory=lambda: dict(DEFAULT_PRICES))
    """USD per 1,000 (input, output) tokens per model, for cost reports."""

    max_payload_bytes: int = 64 * 1024
    """Largest TaskSubmitted message the guard accepts."""
    max_prompt_bytes: int = 32 * 1024
    """Largest prompt the guard accepts, in UTF-8 bytes."""
    max_tools: int = 16
    """Most tools one task may name."""
    max_output_tokens: int = 4096
    """Largest max_tokens a task may ask for."""

    daily_token_limit: int = 10_000
    """Tokens one user may use per UTC day (reserved at admission, billed per step)."""

    max_attempts: int = 3
    """Tries of a step on retryable errors before the task fails."""
    backoff_base_s: float = 0.2
    """First retry delay; doubles each attempt, with full jitter."""
    backoff_max_s: float = 5.0
    """Longest retry delay."""

    breaker_failure_threshold: int = 5
    """Consecutive failures that open a dependency's breaker."""
    breaker_reset_s: float = 60.0
    """Seconds a breaker stays open before it lets a probe through (half-open)."""

    sim_latency_s: float = 0.05
    """Simulated model: seconds per call."""
    sim_failure_rate: float = 0.0
    """Simulated model: share of calls that fail with a transient error (deterministic per step)."""

    concurrency: int = 64
    """Messages one consumer handles at once in this process."""
    ack_wait_s: float = 30.0
    """Seconds before an unacknowledged message is redelivered (long handlers send progress)."""
    max_deliver: int = 10
    """Deliveries before a message that keeps failing goes to the dead-letter stream."""
    dedup_window_s: float = 120.0
    """Window in which a repeated Nats-Msg-Id is dropped by the stream."""
    monitor_poll_s: float = 1.0
    """How often the monitor reads consumer queue depths."""

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_prompt_bytes", "daily_token_limit", "max_attempts",
                     "concurrency", "breaker_failure_threshold", "max_deliver"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.sim_failure_rate <= 1.0:
            raise ConfigError(f"sim_failure_rate must be within 0..1, got {self.sim_failure_rate}")
        if self.ack_wait_s < 1.0:
            raise ConfigError(f"ack_wait_s must be at least 1 second, got {self.ack_wait_s}")
        unknown = {a.model for a in self.agents.values()} - set(self.prices)
        if unknown:
            raise ConfigError(f"no price for model(s) {sorted(unknown)}: add them to [prices]")

    def with_changes(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file (argument or $CORRAL_CONFIG), then CORRAL_* variables."""
    env = dict(os.environ if env is None else env)
    raw: dict[str, Any] = {}
    path = path or env.get(CONFIG_FILE_ENV)
    if path:
        try:
            raw.update(tomllib.loads(Path(path).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    raw.update(_from_env(env))
    if not raw.get("otlp_endpoint") and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        raw["otlp_endpoint"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc


def _from_env(env: dict[str, str]) -> dict[str, Any]:
    fields = {f.name: f for f in msgspec.structs.fields(Settings)}
    values: dict[str, Any] = {}
    for key, value in env.items():
        name = key[len(ENV_PREFIX):].lower() if key.startswith(ENV_PREFIX) else None
        if name not in fields:
            continue
        values[name] = _split(value) if name == "tenants" else value
    return values


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
