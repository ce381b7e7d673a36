"""Webhook sink: each alert and resolution POSTed as JSON to every webhook of the policy, with a timeout and
retries (backoff) on connection errors, timeouts and 5xx answers; a 4xx is final. Sending runs in its own
task from a bounded queue, in order: a slow or dead endpoint holds up the posts queued behind it, never the
evaluation, the log or NATS."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import msgspec

from contracts.policy import Webhook

log = logging.getLogger(__name__)
QUEUE = 1000  # posts waiting to be sent; past it a post is dropped and counted
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0
_encode = msgspec.json.Encoder().encode


class WebhookSender:
    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[tuple[Webhook, bytes]](QUEUE)
        self.counts = {"sent": 0, "failed": 0, "dropped": 0, "retries": 0}

    def send(self, event: Any, webhooks: list[Webhook]) -> None:
        body = _encode(event)
        for webhook in webhooks:
            try:
                self._send.send_nowait((webhook, body))
            except anyio.WouldBlock:
                self.counts["dropped"] += 1
                log.warning("webhook queue full: dropped a post to %s", webhook.url)

    async def run(self, stop: anyio.Event) -> None:
        async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
            tg.start_soon(self._drain, client)
            await stop.wait()
            tg.cancel_scope.cancel()

    async def _drain(self, client: httpx.AsyncClient) -> None:
        async for webhook, body in self._receive:
            await self.post(client, webhook, body)

    async def post(self, client: httpx.AsyncClient, webhook: Webhook, body: bytes) -> bool:
        for attempt in range(webhook.retries + 1):
            if attempt:
                self.counts["retries"] += 1
                await anyio.sleep(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
            try:
                answer = await client.post(webhook.url, content=body, timeout=webhook.timeout_s,
                                           headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:
                log.warning("webhook %s: %r (try %d of %d)", webhook.url, exc, attempt + 1, webhook.retries + 1)
                continue
            if answer.status_code < 300:
                self.counts["sent"] += 1
                return True
            log.warning("webhook %s answered %d (try %d of %d)", webhook.url, answer.status_code, attempt + 1,
                        webhook.retries + 1)
            if answer.status_code < 500:
                break
        self.counts["failed"] += 1
        return False

    def stats(self) -> dict[str, int]:
        return dict(self.counts)
