"""Desired replicas per service, from its durable consumers' backlog and processing rate.

A service wants one replica per `lag_per_replica` messages pending or unacknowledged on its busiest
consumer, and at least one per `rate_per_replica` messages a second its consumers acknowledge, within its
bounds. KEDA's NATS JetStream scaler computes the first from the same consumers (one trigger per consumer,
`lagThreshold`, the most any trigger wants), so a laptop and a cluster scale alike. Advice goes up at once and down only after fewer replicas were wanted for the whole
scale-down delay, so a lull between bursts does not stop replicas that the next burst needs.

Handlers-side code: no NATS here; the monitor's service polls the consumers and publishes the advice.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import msgspec

from contracts import subjects as s
from contracts.events import ScaleAdvice
from contracts.policy import Scaling

CONSUMER_SERVICES = {
    s.CONSUMER_GUARD: "guard",
    s.CONSUMER_BUDGET_ADMIT: "budget",
    s.CONSUMER_BUDGET_USAGE: "budget",
    s.CONSUMER_BUDGET_RELEASE: "budget",
    s.CONSUMER_EXECUTOR_TASKS: "executor",
    s.CONSUMER_EXECUTOR_STEPS: "executor",
    s.CONSUMER_BREAKER: "breaker",
}
"""Which service each durable consumer belongs to; a worker's consumer is named as its service (worker-AGENT)."""


def service_of(durable: str) -> str | None:
    if durable in CONSUMER_SERVICES:
        return CONSUMER_SERVICES[durable]
    return durable if durable.startswith(s.consumer_worker("")) else None


class Backlog(msgspec.Struct, frozen=True, kw_only=True):
    """One durable consumer as the server reported it."""

    durable: str
    pending: int
    ack_pending: int
    acked: int
    """The consumer's ack floor (its sequence): how many it has acknowledged in all."""


class Scaler:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.acked: dict[str, tuple[float, int]] = {}
        """Per durable: when it was last seen, and its ack floor then."""
        self.advised: dict[str, int] = {}
        self.wanted_since: dict[str, float] = {}
        """Per service: when the advice last went up or was last held (the scale-down delay runs from there)."""

    def advise(self, backlogs: Iterable[Backlog], scaling: Scaling) -> list[ScaleAdvice]:
        now = self.clock()
        lag: dict[str, int] = defaultdict(int)
        busiest: dict[str, int] = defaultdict(int)
        rate: dict[str, float] = defaultdict(float)
        for backlog in backlogs:
            if (service := service_of(backlog.durable)) is None:
                continue
            lag[service] += backlog.pending + backlog.ack_pending
            busiest[service] = max(busiest[service], backlog.pending + backlog.ack_pending)
            rate[service] += self._rate(backlog, now)
        return [self._advice(service, lag[service], busiest[service], rate[service], scaling, now)
                for service in sorted(lag)]

    def _rate(self, backlog: Backlog, now: float) -> float:
        then = self.acked.get(backlog.durable)
        self.acked[backlog.durable] = (now, backlog.acked)
        if then is None or now <= then[0] or backlog.acked < then[1]:  # first sight, or the consumer was made anew
            return 0.0
        return (backlog.acked - then[1]) / (now - then[0])

    def _advice(self, service: str, lag: int, busiest: int, rate: float, scaling: Scaling,
                now: float) -> ScaleAdvice:
        bounds = scaling.bounds(service)
        wanted = max(math.ceil(busiest / scaling.lag_per_replica), math.ceil(rate / scaling.rate_per_replica))
        wanted = min(bounds.max_replicas, max(bounds.min_replicas, wanted))
        advised = self.advised.get(service)
        held_long_enough = advised is not None and now - self.wanted_since[service] >= scaling.scale_down_delay_s
        if advised is None or wanted >= advised or held_long_enough:
            self.wanted_since[service] = now
            self.advised[service] = advised = wanted
            why = ""
        else:
            why = f"; {wanted} would do, held for the scale-down delay ({scaling.scale_down_delay_s:g} s)"
        return ScaleAdvice(service=service, replicas=advised, minimum=bounds.min_replicas,
                           maximum=bounds.max_replicas, lag=min(lag, 10**15), processing_rate=round(rate, 3),
                           reason=f"lag {lag}, {rate:.1f} msg/s{why}")
