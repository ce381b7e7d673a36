"""Model tiering's router (an agent's `tiering` policy): cheap models for simple tasks, the advanced ones for
the rest. The executor asks it when a task is admitted, before the fallback chain runs; the worker's side, the
escalation of a fast answer that fails validation, is services/workers/tiering.py.

A fast task gets its chain with the fast-tier strategies first; any other keeps the chain as the policy wrote
it (the advanced tier first). The publisher's hint (metadata `tier`: `fast` or `advanced`) decides first; then
a task is advanced if it names one of `advanced_tools`, says one of `advanced_keywords`, or its prompt is
longer than `max_fast_prompt_tokens`; else fast. With `classify` on, a task the rules send to the fast tier
is also put to the Classifier: its prompt's embedding is compared with the centroids of the policy's
`fast_examples` and `advanced_examples`, and the nearer one decides. The classifier can only move a task up:
what the rules or the hint send to the advanced tier stays there, and a hint of `fast` is kept.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from contracts import TaskSpec
from contracts.policy import AgentPolicy, Strategy, Tiering
from shared.embeddings import Embedder
from shared.tokens import count_tokens

log = logging.getLogger(__name__)
CLASSIFIED_CHARS = 2_000
"""The start of the last message the classifier embeds: the model reads 512 tokens at most, and a longer
prompt is the length rule's to judge."""


def hinted(spec: TaskSpec, rules: Tiering) -> str:
    """The publisher's hint (`fast` or `advanced`), or empty."""
    hint = spec.metadata.get(rules.hint_key, "").strip().lower()
    return hint if hint in ("fast", "advanced") else ""


def tier_for(spec: TaskSpec, rules: Tiering) -> str:
    """`fast` or `advanced`, for this task."""
    if hint := hinted(spec, rules):
        return hint
    if any(tool in rules.advanced_tools for tool in spec.tools):
        return "advanced"
    text = "\n".join(m.content for m in spec.chat())
    words = set(re.findall(r"[a-z]+", text.lower()))
    if any(keyword.lower() in words for keyword in rules.advanced_keywords):
        return "advanced"
    return "advanced" if count_tokens(text) > rules.max_fast_prompt_tokens else "fast"


def route(agent: AgentPolicy, spec: TaskSpec, tier: str | None = None) -> list[Strategy]:
    """The task's chain: the fast tier's strategies first for a fast task (the rest after, in order). `tier`:
    decided already (by `Classifier.tier`); None: by the rules."""
    chain = list(agent.chain)
    if not agent.tiering.enabled or (tier or tier_for(spec, agent.tiering)) != "fast":
        return chain
    fast = [s for s in chain if s.tier == agent.tiering.fast]
    return [*fast, *(s for s in chain if s.tier != agent.tiering.fast)]


class Classifier:
    """Nearest centroid on the embedding: the centroids of each policy's examples are embedded once."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self.embedder = embedder or Embedder()
        self._centroids: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[np.ndarray, np.ndarray]] = {}

    async def tier(self, agent: AgentPolicy, spec: TaskSpec) -> str:
        """The rules' tier, moved up to `advanced` when the classifier is on and the prompt is nearer the
        advanced examples. An embedding that fails leaves the rules' tier (and says so in the log)."""
        rules = agent.tiering
        if not rules.enabled:
            return "advanced"  # the chain as written: no rule is worked out for it
        tier = tier_for(spec, rules)
        if not rules.classify or tier != "fast" or hinted(spec, rules):
            return tier
        chat = spec.chat()
        try:
            return await self.classify(rules, chat[-1].content[:CLASSIFIED_CHARS] if chat else "")
        except Exception as error:  # noqa: BLE001 - a broken embedder must not stop admissions
            log.warning("the tiering classifier failed, the rules decide: %r", error)
            return tier

    async def classify(self, rules: Tiering, text: str) -> str:
        fast, advanced = await self._centres(rules)
        vector = await self.embedder.embed(text)
        return "advanced" if float(vector @ advanced) > float(vector @ fast) else "fast"

    async def _centres(self, rules: Tiering) -> tuple[np.ndarray, np.ndarray]:
        key = (tuple(rules.fast_examples), tuple(rules.advanced_examples))
        if key not in self._centroids:
            if len(self._centroids) >= 16:  # one per policy version in use; old ones go
                self._centroids.clear()
            self._centroids[key] = (await self._centre(key[0]), await self._centre(key[1]))
        return self._centroids[key]

    async def _centre(self, examples: tuple[str, ...]) -> np.ndarray:
        mean = np.mean([await self.embedder.embed(text) for text in examples], axis=0)
        return mean / (float(np.linalg.norm(mean)) or 1.0)

    async def aclose(self) -> None:
        await self.embedder.aclose()
