"""Test helpers for resilience: hear step and breaker events as they happen; a policy roomy enough
that limits and budgets never get in the way of many tasks from one user."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Union

import msgspec

from contracts import BreakerChanged, StepCompleted, StepFailed, StepRequested, subjects
from contracts.policy import BudgetLimits, Defaults, Policy, RateLimit
from services.client import Client
from shared.policy import load_policy_file
from tests.conftest import wait_until

EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "docs" / "policy-resilience.example.toml"
_decode = msgspec.json.Decoder(Union[StepRequested, StepCompleted, StepFailed, BreakerChanged]).decode
PLENTY = RateLimit(requests_per_minute=1e6, tokens_per_minute=1e9, burst_requests=100_000, burst_tokens=10**9)


def example_policy(**changes) -> Policy:
    """docs/policy-resilience.example.toml, with roomy limits and budgets, and `changes` on top."""
    policy = load_policy_file(EXAMPLE_POLICY)
    roomy = Defaults(rate=PLENTY, tenant_rate=PLENTY, budget=BudgetLimits(daily_tokens=10**9, hourly_tokens=10**9),
                     tenant_budget=BudgetLimits(daily_tokens=10**9, hourly_tokens=10**9))
    return msgspec.structs.replace(policy, defaults=roomy, **changes)


class Signals:
    """Every step and breaker event published while the block runs, with the time it was heard."""

    def __init__(self) -> None:
        self.events: list[tuple[float, object]] = []

    def of(self, kind: type, **fields) -> list:
        return [e for _, e in self.events if isinstance(e, kind)
                and all(getattr(e, name) == value for name, value in fields.items())]

    async def first(self, kind: type, timeout: float = 10.0, **fields):
        """Wait for the first event of `kind` with those fields."""

        async def heard():
            found = self.of(kind, **fields)
            return found[0] if found else None

        return await wait_until(heard, timeout=timeout)

    def breaker(self, dependency: str, state: str) -> BreakerChanged | None:
        changes = self.of(BreakerChanged, dependency=dependency, state=state)
        return changes[0] if changes else None


@asynccontextmanager
async def signals(client: Client) -> AsyncIterator[Signals]:
    heard = Signals()

    async def on_msg(msg) -> None:
        try:
            heard.events.append((time.time(), _decode(msg.data)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass

    subs = [await client.bus.nc.subscribe(subject, cb=on_msg) for subject in (subjects.ALL_STEP_EVENTS,
                                                                              subjects.ALL_BREAKER)]
    try:
        yield heard
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def replica_views(client: Client, service: str, dependency: str, expect: int | None = None) -> list[dict]:
    """What each replica of `service` believes about `dependency`'s circuit (from its $SRV.STATS):
    one dict per replica, with `state`, `forced` and `seen_at` (empty for a replica that never saw it);
    with `expect`, once that many replicas answered."""
    views = []
    for reply in await client.replica_stats(service, expect=expect):
        data = reply["endpoints"][0].get("data") or {}
        views.append(data.get("breakers", {}).get(dependency, {}))
    return views
