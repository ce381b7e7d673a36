"""Reserving more for one part of a running plan (a subtask, or the synthesis) that would take its task past what
it holds. The executor (centralized, hybrid) and the pools (distributed, hybrid) ask the budget the same way: a
part's estimate is its prompt as the tokenizer counts it plus the output it may write, and a part asks for what
the task's reservation lacks for it, once (the budget holds each part's extension once, whoever asks again)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from contracts import subjects
from contracts.commands import ExtendReservation
from contracts.queries import ReservationReply
from shared.errors import TransientError
from shared.tokens import count_tokens

Reserve = Callable[[ExtendReservation], Awaitable[ReservationReply]]
REQUEST_TIMEOUT_S = 2.0
PART_OVERHEAD = 16
"""Tokens of one part's framing around its text (the message overhead, the inputs' headings): the guard's
estimate of a plan and a part's own estimate count the same."""
MAX_ASK = 10_000_000
log = logging.getLogger(__name__)
_reply = msgspec.json.Decoder(ReservationReply).decode


def part_estimate(prompt: str, max_output_tokens: int) -> int:
    """What one part may use: its prompt, counted, and all the output it may write."""
    return count_tokens(prompt) + PART_OVERHEAD + max_output_tokens


def shortfall(reserved: int, committed: int, estimate: int) -> int:
    """Tokens a part needs beyond the task's reservation: what the task holds, less what its parts used or may
    use now (`committed`), against the new part's estimate. 0: covered."""
    return max(0, min(MAX_ASK, committed + estimate - reserved))


def reservation_requester(nc) -> Reserve:
    """Ask the budget service (request/reply). No answer is a transient error: the event that needed it comes
    again, and the part starts once the budget has said yes or no."""

    async def reserve(command: ExtendReservation) -> ReservationReply:
        try:
            reply = await nc.request(subjects.BUDGET_EXTEND, msgspec.json.encode(command), timeout=REQUEST_TIMEOUT_S)
            return _reply(reply.data)
        except (NatsTimeout, NoRespondersError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TransientError(f"the budget did not answer a request to reserve {command.tokens} more tokens for "
                                 f"part {command.part} of task {command.task_id} ({exc!r}); trying again") from exc

    return reserve
