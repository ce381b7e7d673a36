"""A Message Batches API server for the tests: Anthropic's batch protocol in front of a real model.

No program on this machine speaks Anthropic's Message Batches API offline (llama.cpp and LiteLLM's proxy
serve the Messages API, not its batches), so this one does, written for the tests. It answers
`POST /v1/messages/batches`, `GET /v1/messages/batches/{id}`, `GET /v1/messages/batches/{id}/results` and
`POST /v1/messages/batches/{id}/cancel` as Anthropic documents them (a cancel is noted; the requests under
way finish), and works through each batch by sending every request's `params` to the
upstream's Messages API (the local model server's `/v1/messages`), `--parallel` at a time. It refuses, as
`errored` results, requests whose `max_tokens` is above `--max-tokens` (Anthropic's answer to a request
its model cannot take). `GET /stats` lists the batches it was sent, for the tests to see how calls were
grouped.

    python -m tests.batch_api --upstream http://127.0.0.1:8089/v1

prints `batch API ready at http://127.0.0.1:PORT/v1` once it listens; stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

READY = "batch API ready at"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_REQUESTS = 10_000


@dataclass
class Batch:
    id: str
    size: int
    created_at: float
    ended_at: float | None = None
    canceled: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


class BatchApi:
    def __init__(self, upstream: str, parallel: int, max_tokens: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.limit = asyncio.Semaphore(parallel)
        self.max_tokens = max_tokens
        self.batches: dict[str, Batch] = {}
        self.http = httpx.AsyncClient(timeout=300)
        self.base = ""

    def view(self, batch: Batch) -> dict[str, Any]:
        ended = batch.ended_at is not None
        counts = {"processing": 0 if ended else batch.size, "canceled": 0, "expired": 0,
                  "succeeded": sum(r["result"]["type"] == "succeeded" for r in batch.results),
                  "errored": sum(r["result"]["type"] == "errored" for r in batch.results)}
        return {"id": batch.id, "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                "request_counts": counts, "created_at": _rfc3339(batch.created_at),
                "ended_at": _rfc3339(batch.ended_at) if ended else None,
                "results_url": f"{self.base}/v1/messages/batches/{batch.id}/results" if ended else None}

    async def create(self, request: Request) -> Response:
        try:
            body = await request.json()
            requests = body["requests"]
            assert isinstance(requests, list) and 0 < len(requests) <= MAX_REQUESTS
            ids = [item["custom_id"] for item in requests]
            assert all(isinstance(i, str) and CUSTOM_ID.match(i) for i in ids) and len(set(ids)) == len(ids)
            assert all(isinstance(item["params"], dict) for item in requests)
        except (ValueError, KeyError, TypeError, AssertionError):
            return _error(400, "invalid_request_error", "requests: a list of {custom_id, params}, custom_ids unique")
        batch = Batch(id=f"msgbatch_{secrets.token_hex(12)}", size=len(requests), created_at=time.time())
        self.batches[batch.id] = batch
        asyncio.get_running_loop().create_task(self.work(batch, requests))
        return JSONResponse(self.view(batch))

    async def work(self, batch: Batch, requests: list[dict[str, Any]]) -> None:
        batch.results = list(await asyncio.gather(*(self.answer(item) for item in requests)))
        batch.ended_at = time.time()

    async def answer(self, item: dict[str, Any]) -> dict[str, Any]:
        params = item["params"]
        if int(params.get("max_tokens", 0)) > self.max_tokens:
            return {"custom_id": item["custom_id"], "result": {"type": "errored", "error": {
                "type": "error", "error": {"type": "invalid_request_error",
                                           "message": f"max_tokens: {params['max_tokens']} > {self.max_tokens}"}}}}
        async with self.limit:
            reply = await self.http.post(f"{self.upstream}/messages", json={**params, "stream": False})
        if reply.status_code != 200:
            return {"custom_id": item["custom_id"], "result": {"type": "errored", "error": reply.json()}}
        return {"custom_id": item["custom_id"], "result": {"type": "succeeded", "message": reply.json()}}

    async def retrieve(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        return _error(404, "not_found_error", "no such batch") if batch is None else JSONResponse(self.view(batch))

    async def cancel(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, "not_found_error", "no such batch")
        batch.canceled = True
        return JSONResponse({**self.view(batch), "processing_status": "canceling"})

    async def results(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None or batch.ended_at is None:
            return _error(404, "not_found_error", "no results for this batch (yet)")
        lines = "".join(json.dumps(result) + "\n" for result in reversed(batch.results))  # any order, says the API
        return Response(lines, media_type="application/binary")

    async def stats(self, request: Request) -> Response:
        return JSONResponse({"batches": [{"id": b.id, "size": b.size, "created_at": b.created_at,
                                          "canceled": b.canceled} for b in self.batches.values()]})


def _rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1e6):06d}Z"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="a Messages API base URL (e.g. the local model's /v1)")
    parser.add_argument("--parallel", type=int, default=4, help="upstream calls at once (default 4)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="larger max_tokens are errored (default 4096)")
    args = parser.parse_args()
    api = BatchApi(args.upstream, args.parallel, args.max_tokens)
    app = Starlette(routes=[
        Route("/v1/messages/batches", api.create, methods=["POST"]),
        Route("/v1/messages/batches/{batch_id}", api.retrieve, methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}/results", api.results, methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}/cancel", api.cancel, methods=["POST"]),
        Route("/stats", api.stats, methods=["GET"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the port is the kernel's choice, so no other process can hold it
    sock.listen(128)
    api.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    print(f"{READY} {api.base}/v1", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
