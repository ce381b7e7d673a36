"""Anthropic's Message Batches API: many Messages requests sent as one batch, answered when the provider has
worked through it, at half the price (docs/caching.md "Batching").

`MessageBatches.run` POSTs `{base_url}/messages/batches` with each request's Messages body under a
`custom_id`, asks `GET {base_url}/messages/batches/{id}` every `poll_s` until its `processing_status` is
`ended` (or cancels it at `.../cancel` once every call that waited for it gave up), then reads the JSONL at
its `results_url`: one line per request, in any order, whose `result` is
`succeeded` (the whole `message`), `errored` (an API error), `canceled` or `expired`. Each request gets its
own Completion or ProviderError; a batch that cannot be sent, or whose results cannot be read, fails them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from services.workers.conversation import Completion, ModelRequest
from services.workers.errors import ProviderError, TransientProviderError
from services.workers.providers.anthropic import params, whole_answer
from services.workers.providers.http import Api, ErrorDetail, ErrorReport, class_for_kind, report_of

MAX_RESULTS_BYTES = 64 * 1024 * 1024
"""The largest results file read: a batch of a few thousand long answers."""


class _Batch(msgspec.Struct):
    id: str
    processing_status: str = ""
    results_url: str | None = None


class _Error(msgspec.Struct):
    """An errored result's error: an API error object, `{"type": "error", "error": {...}}`, or its inner part."""

    type: str = ""
    message: str = ""
    error: ErrorDetail | str | None = None


class _Result(msgspec.Struct):
    type: str = ""
    message: msgspec.Raw = msgspec.Raw(b"")
    """A succeeded result's whole answer, decoded as the Messages API's (empty: none came)."""
    error: _Error | None = None


class _Line(msgspec.Struct):
    custom_id: str = ""
    result: _Result | None = None


_batch = msgspec.json.Decoder(_Batch)
_line = msgspec.json.Decoder(_Line)

Outcome = Completion | ProviderError


class MessageBatches:
    """One provider's Message Batches endpoint, over its Api (the same key, URL and connection pool)."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def run(self, requests: list[ModelRequest], *, poll_s: float,
                  wanted: Callable[[], bool] = lambda: True) -> list[Outcome]:
        """Each request's answer or error, in the order of `requests`. Once `wanted()` says no call waits for
        the answers any more, the batch is canceled at the provider and the run fails."""
        ids = [f"r{index}" for index in range(len(requests))]
        body = {"requests": [{"custom_id": custom_id, "params": params(request)}
                             for custom_id, request in zip(ids, requests)]}
        batch = self._decode(await self.api.fetch("POST", "messages/batches", body))
        while batch.processing_status != "ended":
            await anyio.sleep(poll_s)
            if not wanted():
                await self.api.fetch("POST", f"messages/batches/{batch.id}/cancel")
                raise TransientProviderError(f"{self.api.name}: every call of batch {batch.id} gave up: canceled")
            batch = self._decode(await self.api.fetch("GET", f"messages/batches/{batch.id}"))
        if not batch.results_url:
            raise TransientProviderError(f"{self.api.name}: batch {batch.id} ended without a results_url")
        lines = await self.api.fetch("GET", batch.results_url, limit=MAX_RESULTS_BYTES)
        return _outcomes(ids, requests, lines, self.api.name)

    def _decode(self, body: bytes) -> _Batch:
        try:
            return _batch.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise TransientProviderError(f"{self.api.name}: a malformed message batch: {error}") from None


def _outcomes(ids: list[str], requests: list[ModelRequest], lines: bytes, provider: str) -> list[Outcome]:
    by_id: dict[str, Outcome] = {}
    wanted = dict(zip(ids, requests))
    for raw in lines.splitlines():
        if not raw.strip():
            continue
        try:
            line = _line.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # a line that does not decode answers no request: that one fails as missing below
        request = wanted.get(line.custom_id)
        if request is not None and line.result is not None:
            by_id[line.custom_id] = _outcome(request, line.result, provider)
    missing = TransientProviderError(f"{provider}: the batch's results did not answer this request")
    return [by_id.get(custom_id, missing) for custom_id in ids]


def _outcome(request: ModelRequest, result: _Result, provider: str) -> Outcome:
    if result.type == "succeeded" and len(result.message):
        try:
            completion = whole_answer(request, bytes(result.message))
        except ProviderError as error:
            return error
        return msgspec.structs.replace(completion, first_token_s=None,
                                       usage=msgspec.structs.replace(completion.usage, batched=True))
    if result.type == "errored":
        report = _report(result.error)
        return class_for_kind(report.kind)(f"{provider}: in the batch: {report.message}")
    return TransientProviderError(f"{provider}: the batch's request was {result.type or 'not answered'}")


def _report(error: _Error | None) -> ErrorReport:
    if error is None:
        return ErrorReport("no message", "")
    inner: Any = error.error if error.error is not None else ErrorDetail(type=error.type, message=error.message)
    return report_of(inner) or ErrorReport(error.message or "no message", error.type)
