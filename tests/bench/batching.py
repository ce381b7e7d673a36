"""Batching on the local model: `python -m tests.bench.batching`. It reports; it never asserts.

llama.cpp's server decodes the requests of all its parallel slots in one batch (continuous batching), so
requests that arrive together share each forward pass. This runs the local model server (services.local_model,
SmolLM2-135M on this CPU) with 1, 2 and 4 slots and sends the same requests, all at once, as a worker's
concurrent steps would (its consumer takes several steps at once): wall time, output tokens per second,
and each request's latency, which includes its wait for a free slot.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio
import httpx
from rich.console import Console
from rich.table import Table

from services.local_model import MODEL_NAME, local_model_server
from services.monitor.handlers import percentiles

PROMPTS = ["What is a message queue?", "Name three uses of a cache.", "What is a circuit breaker?",
           "Why batch requests?", "What is a token budget?", "What does an executor do?",
           "What is a fallback chain?", "Why trace requests?"]


async def burst(url: str, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0

    async def one(n: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        started = time.perf_counter()
        body = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]}
        reply = (await http.post(f"{url}/chat/completions", json=body)).json()
        latencies.append((time.perf_counter() - started) * 1000)
        tokens += reply["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=300) as http:
        await one(0, http)  # warm-up
        latencies.clear()
        tokens = 0
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for n in range(requests):
                tg.start_soon(one, n, http)
        wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "latency": percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8, help="requests sent at once (default 8)")
    parser.add_argument("--max-tokens", type=int, default=48, help="output cap of each answer (default 48)")
    parser.add_argument("--slots", type=int, nargs="*", default=[1, 2, 4], help="parallel slots to try")
    args = parser.parse_args()
    table = Table(title=f"{args.requests} requests at once to the local model (SmolLM2-135M, llama.cpp, this CPU)")
    for column in ("slots", "wall s", "output tokens", "tokens/s", "request p50 ms", "request p95 ms"):
        table.add_column(column, justify="right")
    for slots in args.slots:
        with tempfile.TemporaryDirectory(prefix="corral-bench-batching-") as tmp, \
                local_model_server(Path(tmp), parallel=slots, ctx=1024 * slots) as url:
            result = anyio.run(burst, url, args.requests, args.max_tokens)
        table.add_row(str(slots), f"{result['wall_s']:.2f}", str(result["tokens"]),
                      f"{result['tokens'] / result['wall_s']:.0f}", f"{result['latency'].p50_ms:.0f}",
                      f"{result['latency'].p95_ms:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
