"""Model tiering's router (an agent's `tiering` policy): cheap models for simple tasks, the advanced ones for
the rest. The executor asks it when a task is admitted, before the fallback chain runs; the worker's side, the
escalation of a fast answer that fails validation, is services/workers/tiering.py.

A fast task gets its chain with the fast-tier strategies first; any other keeps the chain as the policy wrote
it (the advanced tier first). The publisher's hint (metadata `tier`: `fast` or `advanced`) decides first; then
a task is advanced if it names one of `advanced_tools`, says one of `advanced_keywords`, or its prompt is
longer than `max_fast_prompt_tokens`; else fast.
"""

from __future__ import annotations

import re

from contracts import TaskSpec
from contracts.policy import AgentPolicy, Strategy, Tiering
from shared.tokens import count_tokens


def tier_for(spec: TaskSpec, rules: Tiering) -> str:
    """`fast` or `advanced`, for this task."""
    hint = spec.metadata.get(rules.hint_key, "").strip().lower()
    if hint in ("fast", "advanced"):
        return hint
    if any(tool in rules.advanced_tools for tool in spec.tools):
        return "advanced"
    text = "\n".join(m.content for m in spec.chat())
    words = set(re.findall(r"[a-z]+", text.lower()))
    if any(keyword.lower() in words for keyword in rules.advanced_keywords):
        return "advanced"
    return "advanced" if count_tokens(text) > rules.max_fast_prompt_tokens else "fast"


def route(agent: AgentPolicy, spec: TaskSpec) -> list[Strategy]:
    """The task's chain: the fast tier's strategies first for a fast task (the rest after, in order)."""
    chain = list(agent.chain)
    if not agent.tiering.enabled or tier_for(spec, agent.tiering) != "fast":
        return chain
    fast = [s for s in chain if s.tier == agent.tiering.fast]
    return [*fast, *(s for s in chain if s.tier != agent.tiering.fast)]
