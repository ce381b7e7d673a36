"""Model tiering's escalation (an agent's `tiering` policy; the router is shared/tiering.py): a fast-tier answer
that is empty, a refusal, or not valid for the agent's `answer_schema` fails its step as `permanent`, so the
chain moves on to its next strategy, the advanced tier, and the executor records the failed try as an attempt.
"""

from __future__ import annotations

import re
from functools import lru_cache

import jsonschema
import msgspec

from contracts import StepRequested
from contracts.policy import AgentPolicy

REFUSAL = re.compile(r"^\s*(i'?m sorry|sorry|i cannot|i can'?t|i am unable|i'?m unable|as an ai)\b", re.IGNORECASE)


def invalid_answer(step: StepRequested, agent: AgentPolicy | None, text: str) -> str:
    """Why a fast-tier answer must be escalated (empty: it stands)."""
    if agent is None or not agent.tiering.enabled or not agent.tiering.escalate or step.tier != agent.tiering.fast:
        return ""
    if not text.strip():
        return "empty"
    if REFUSAL.match(text):
        return "refused"
    if agent.tiering.answer_schema:
        try:
            jsonschema.validate(msgspec.json.decode(text.strip()), _schema(agent.tiering.answer_schema))
        except (msgspec.DecodeError, jsonschema.ValidationError) as error:
            return f"not valid for the answer schema: {str(error).splitlines()[0][:200]}"
    return ""


@lru_cache(maxsize=64)
def _schema(text: str) -> dict:
    return msgspec.json.decode(text)
