"""Which submission holds each (tenant, task id): the guard's de-duplication of submissions, shared by
every guard replica through the `corral_submissions` bucket.

A publisher's task id is its idempotency key, within its tenant. The first submission of an id
claims it (a KV create: one wins, whatever the replicas); a repeat finds the claim held by another
submission and gets nothing new: it is not judged again, charges no rate limit and starts no second
run. The same id from another tenant is another key, so another task. A submission the guard refused
leaves its rejection in the claim: a redelivery of it publishes that same rejection again, and a later
submission of the id takes the claim over and is judged afresh (a rate-limited task may be sent again
after its retry-after, with the same id).

Claims are kept as long as an ingress message can be delivered again, and a day more.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from contracts import TaskRejected
from shared.streams import DAY, EVENTS_MAX_AGE_S

CLAIM_TTL_S = EVENTS_MAX_AGE_S + DAY


class Claim(msgspec.Struct, kw_only=True):
    """One (tenant, task id), keyed by its task ref."""

    seq: int
    """Ingress stream sequence of the submission holding it: the same on each of its redeliveries."""
    received_at: datetime
    rejection: TaskRejected | None = None
    """The guard refused that submission, with this (published) answer."""


def take_over(claim: Claim, *, mine: Claim) -> bool:
    """Hand a refused submission's claim to `mine` (a later submission of the same id); True if `mine`
    holds it now. A claim that passed, or is being decided, stays with its holder."""
    if claim.seq == mine.seq:
        return True
    if claim.rejection is None:
        return False
    claim.seq, claim.received_at, claim.rejection = mine.seq, mine.received_at, None
    return True


def record_rejection(claim: Claim, *, seq: int, rejection: TaskRejected) -> None:
    """Keep the answer to the submission that holds the claim (before it is published)."""
    if claim.seq == seq:
        claim.rejection = rejection
