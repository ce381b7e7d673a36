"""Typed settings of a process: defaults, then an optional TOML file, then CORRAL_* variables.

These are the infrastructure knobs (where NATS is, how a consumer behaves). What
an operator decides about tenants, limits, budgets, prices, agents and breakers
is the policy (contracts/policy.py), applied at run time with `corral policy apply`.
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


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a Corral process can be told. Env: CORRAL_<FIELD> (upper case)."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server or cluster to connect to (comma-separate several URLs)."""
    nats_credentials: str = ""
    """File this process signs in to NATS with: an nkey seed (`corral auth init` writes one per identity under
    <data dir>/auth/) or a JWT `.creds` file. Empty: none, for a server without auth."""
    nats_tls_ca: str = ""
    """CA certificate file (PEM) the NATS server's certificate must chain to. Set: every connection uses TLS,
    and a server that does not offer it is refused."""
    nats_tls_cert: str = ""
    """Client certificate file (PEM), for a server that verifies its clients (with nats_tls_key)."""
    nats_tls_key: str = ""
    """Private key file (PEM) of nats_tls_cert."""
    otlp_endpoint: str = ""
    """OTLP/HTTP collector base URL (e.g. http://localhost:4318); empty: no export.
    OTEL_EXPORTER_OTLP_ENDPOINT is honoured too."""
    trace_content: bool = False
    """Put prompts, answers and tool arguments in model and tool spans (gen_ai.input.messages, …). Off: spans
    carry models, tokens and errors only, never what users wrote."""
    local_model_url: str = ""
    """The local model server (llama.cpp, OpenAI's protocol) of providers whose base_url is empty, e.g.
    http://127.0.0.1:8089/v1; `corral up --model local` starts one and sets it."""
    stream_replicas: int = 1
    """Replicas of each stream and bucket: 1 on one server, 3 on a cluster."""

    max_payload_bytes: int = 64 * 1024
    """Largest TaskSubmitted message the guard accepts."""
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
    monitor_max_scopes: int = 256
    """Tenants, agent kinds and models the monitor keeps figures of apart; past it, new ones are counted
    together (`tenant:other`, `agent:other`, `model:other`)."""
    monitor_snapshot_s: float = 30.0
    """How often the monitor snapshots its figures to its bucket; a restart replays the streams from there."""
    monitor_otlp_interval_s: float = 10.0
    """How often the monitor exports its metrics over OTLP (with otlp_endpoint set)."""
    metrics_port: int = -1
    """The monitor's Prometheus scrape endpoint (`/metrics`): -1 off, 0 any free port, else that port."""
    metrics_host: str = "127.0.0.1"
    """Where the scrape endpoint listens (0.0.0.0: every interface, for a Prometheus elsewhere)."""
    budget_hold_timeout_s: float = 900.0
    """A reservation whose task has not ended after this many seconds is released (a crashed task
    leaks no budget). Keep it above the longest task."""
    budget_sweep_s: float = 30.0
    """How often each budget replica looks for reservations past the timeout."""
    budget_account_max_bytes: int = 0
    """A user's or tenant's budget account (one hold per running task) larger than this takes no new task,
    so its running tasks' steps and releases still fit in a message. 0: half the server's max payload."""

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "concurrency", "max_deliver", "budget_hold_timeout_s", "budget_sweep_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.budget_account_max_bytes < 0:
            raise ConfigError(f"budget_account_max_bytes must be 0 or more, got {self.budget_account_max_bytes}")
        if not 0.0 <= self.sim_failure_rate <= 1.0:
            raise ConfigError(f"sim_failure_rate must be within 0..1, got {self.sim_failure_rate}")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ConfigError("nats_tls_cert and nats_tls_key go together: set both, or neither")
        if self.ack_wait_s < 1.0:
            raise ConfigError(f"ack_wait_s must be at least 1 second, got {self.ack_wait_s}")

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
        values[name] = value
    return values
