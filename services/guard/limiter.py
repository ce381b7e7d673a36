"""Rate limits shared by every guard replica: GCRA state in a KV bucket, written with CAS.

GCRA (the generic cell rate algorithm) keeps one number per limit, the
theoretical arrival time `tat`: when the caller's "debt" is paid off. A request
of cost n adds n·T (T = 60 s / per-minute rate); it conforms while the debt
after it, `max(tat, now) + n·T - now`, stays within the burst, `burst·T`. Over any
span t, that admits at most rate·t + burst: exact however many replicas run,
because every replica updates the same key with compare-and-set.

One key per user (`user.<tenant>.<user>`) and one per tenant (`tenant.<tenant>`),
each holding both the request and the token limit, so one CAS decides a scope.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from contracts.policy import RateLimit
from shared.kv import TypedBucket


class Cell(msgspec.Struct, kw_only=True):
    """GCRA state of one scope: theoretical arrival times for requests and tokens."""

    requests_tat: float = 0.0
    tokens_tat: float = 0.0


class Verdict(msgspec.Struct, frozen=True):
    allowed: bool
    retry_after_s: float = 0.0
    limit: str = ""
    """Which limit refused: "requests" or "tokens"."""


def _debt_after(tat: float, now: float, cost: float, per_minute: float) -> tuple[float, float]:
    """(new tat, debt in seconds after charging `cost` units)."""
    interval = 60.0 / per_minute
    new_tat = max(tat, now) + cost * interval
    return new_tat, new_tat - now


def charge(cell: Cell, limit: RateLimit, tokens: int, now: float) -> Verdict:
    """Charge one request of `tokens` estimated tokens if both limits allow it (mutates `cell`)."""
    req_tat, req_debt = _debt_after(cell.requests_tat, now, 1, limit.requests_per_minute)
    req_room = limit.burst_requests * 60.0 / limit.requests_per_minute
    if req_debt > req_room:
        return Verdict(False, req_debt - req_room, "requests")
    tok_tat, tok_debt = _debt_after(cell.tokens_tat, now, tokens, limit.tokens_per_minute)
    tok_room = limit.burst_tokens * 60.0 / limit.tokens_per_minute
    if tok_debt > tok_room:
        return Verdict(False, tok_debt - tok_room, "tokens")
    cell.requests_tat, cell.tokens_tat = req_tat, tok_tat
    return Verdict(True)


def refund(cell: Cell, limit: RateLimit, tokens: int) -> None:
    """Undo a charge (when a later scope refused the same request)."""
    cell.requests_tat -= 60.0 / limit.requests_per_minute
    cell.tokens_tat -= tokens * 60.0 / limit.tokens_per_minute


class RateLimiter:
    """Charges a request against its user's and its tenant's limits, or neither."""

    def __init__(self, cells: TypedBucket[Cell], clock: Callable[[], float]) -> None:
        self.cells = cells
        self.clock = clock

    async def admit(self, tenant: str, user: str, tokens: int, user_limit: RateLimit,
                    tenant_limit: RateLimit) -> Verdict:
        user_key, tenant_key = f"user.{tenant}.{user}", f"tenant.{tenant}"
        verdict = await self.cells.update(user_key, lambda cell: charge(cell, user_limit, tokens, self.clock()))
        if not verdict.allowed:
            return verdict
        tenant_verdict = await self.cells.update(tenant_key,
                                                 lambda cell: charge(cell, tenant_limit, tokens, self.clock()))
        if not tenant_verdict.allowed:  # two scopes, two keys: give the user's charge back
            await self.cells.update(user_key, lambda cell: refund(cell, user_limit, tokens))
            return msgspec.structs.replace(tenant_verdict, limit=f"tenant {tenant_verdict.limit}")
        return verdict
