"""Batching on the local model: `python -m tests.bench.batching`. It reports; it never asserts.

Two parts, both on the local model server (services.local_model: SmolLM2-135M, llama.cpp, this CPU):

1. Through the whole pipeline (every service its own OS process on an embedded nats-server): the same tasks
   submitted at once to two agents. `direct` calls the model server's Messages API, one streamed call per
   step, the worker's concurrent steps sharing its parallel slots. `batched` has `batching` on, through
   the Message Batches API of the tests' batch API server (tests/batch_api.py) in front of the same model
   server: calls are held up to `max_wait_ms` and sent as one batch. For each: wall time, output tokens per
   second, a task's latency, the batches sent, and the cost the budget billed at an illustrative price
   whose batch share is 0.5 (Anthropic's and OpenAI's).
2. The model server alone with 1, 2 and 4 parallel slots, the same requests sent all at once: what its
   continuous batching does with requests that arrive together.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx
import msgspec
from rich.console import Console
from rich.table import Table

from contracts import TaskCompleted, TaskSpec
from contracts.policy import DEFAULT_POLICY, AgentPolicy, Batching, Defaults, Limits, Price, ProviderConfig, Strategy
from services.client import Client
from services.local_model import MODEL_NAME, local_model_server
from services.monitor.handlers import percentiles
from services.stack import Services, nats_server
from shared.config import Settings
from shared.policy import apply_policy
from tests.batch_api import READY
from tests.bench.common import ISOLATED_ENV
from tests.bench.savings import PLENTY, ROOMY

PROMPTS = ["What is a message queue?", "Name three uses of a cache.", "What is a circuit breaker?",
           "Why batch requests?", "What is a token budget?", "What does an executor do?",
           "What is a fallback chain?", "Why trace requests?"]
PRICE = Price(input=0.003, output=0.015, cached=0.003, batch=0.5)
"""Illustrative USD per 1,000 tokens (a mid-sized hosted model's), with the batch APIs' half price."""
AGENTS = ("direct", "batched")


def bench_policy(model_url: str, batch_url: str, max_wait_ms: float):
    strategy = {"direct": Strategy(provider="model", model=MODEL_NAME, timeout_s=300.0),
                "batched": Strategy(provider="batches", model=MODEL_NAME, timeout_s=300.0)}
    agents = {"direct": AgentPolicy(chain=[strategy["direct"]], deadline_s=600.0),
              "batched": AgentPolicy(chain=[strategy["batched"]], deadline_s=600.0,
                                     batching=Batching(enabled=True, max_wait_ms=max_wait_ms, poll_s=0.1))}
    return msgspec.structs.replace(
        DEFAULT_POLICY, description="bench: batching", agents=agents, prices={MODEL_NAME: PRICE},
        providers={"model": ProviderConfig(kind="anthropic", base_url=model_url),
                   "batches": ProviderConfig(kind="anthropic", base_url=batch_url, batches=True)},
        defaults=Defaults(rate=ROOMY, tenant_rate=ROOMY, budget=PLENTY, tenant_budget=PLENTY),
        limits=Limits(max_request_tokens=64_000))


async def run_agent(client: Client, agent: str, tasks: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    ends: list = []

    async def one(n: int) -> None:
        started = time.perf_counter()
        end = await client.run(TaskSpec(agent=agent, prompt=PROMPTS[n % len(PROMPTS)], max_tokens=max_tokens),
                               tenant="default", user="bench", timeout=600)
        latencies.append((time.perf_counter() - started) * 1000)
        ends.append(end)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(tasks):
            tg.start_soon(one, n)
    wall = time.perf_counter() - started
    done = [end for end in ends if isinstance(end, TaskCompleted)]
    costs = [await client.cost(end.task_id, tenant="default") for end in done]
    return {"completed": len(done), "wall_s": wall, "output_tokens": sum(e.usage.output_tokens for e in done),
            "cost_usd": sum(c.cost_usd for c in costs), "latency": percentiles(latencies)}


async def pipeline(settings: Settings, names: list[str], policy, tasks: int, max_tokens: int) -> dict[str, dict]:
    async with Client.connect(settings, "bench") as client:
        version = await apply_policy(await client.bus.policy_bucket(), policy)
        await client.wait_ready(names, timeout=60)
        await client.wait_policy(version, names)
        await run_agent(client, "direct", 1, max_tokens)  # warm-up
        return {agent: await run_agent(client, agent, tasks, max_tokens) for agent in AGENTS}


def batch_api(model_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "tests.batch_api", "--upstream", model_url],
                                stdout=subprocess.PIPE, stderr=sink, text=True)
    line = proc.stdout.readline()
    if not line.startswith(READY):
        proc.terminate()
        raise SystemExit(f"the batch API server did not start; see {log}")
    return proc, line.removeprefix(READY).strip()


def through_the_pipeline(args: argparse.Namespace, console: Console) -> None:
    with tempfile.TemporaryDirectory(prefix="corral-bench-batching-") as tmp:
        data_dir = Path(tmp)
        with local_model_server(data_dir, parallel=4, ctx=4096) as model_url, nats_server(data_dir) as nats_url:
            proc, batch_url = batch_api(model_url, data_dir / "batch-api.log")
            services = Services(nats_url, data_dir / "logs", agents=list(AGENTS), env=ISOLATED_ENV)
            services.start()
            try:
                results = anyio.run(pipeline, Settings(nats_url=nats_url), services.names(),
                                    bench_policy(model_url, batch_url, args.max_wait_ms), args.tasks, args.max_tokens)
                sizes = [b["size"] for b in httpx.get(batch_url.removesuffix("/v1") + "/stats").json()["batches"]]
            finally:
                services.stop()
                proc.terminate()
    table = Table(title=f"{args.tasks} tasks at once through the pipeline, local model with 4 slots "
                        f"(batched: max_wait_ms {args.max_wait_ms:g}; cost at ${PRICE.input}/${PRICE.output} per 1k "
                        f"tokens, batch share {PRICE.batch})")
    for column in ("agent", "completed", "wall s", "output tokens", "tokens/s", "task p50 ms", "task p95 ms",
                   "cost", "vs direct"):
        table.add_column(column, justify="left" if column == "agent" else "right")
    base = results["direct"]["cost_usd"]
    for agent, r in results.items():
        change = (r["cost_usd"] / base - 1) * 100 if base else 0.0
        table.add_row(agent, str(r["completed"]), f"{r['wall_s']:.2f}", str(r["output_tokens"]),
                      f"{r['output_tokens'] / r['wall_s']:.0f}", f"{r['latency'].p50_ms:.0f}",
                      f"{r['latency'].p95_ms:.0f}", f"${r['cost_usd']:.4f}", f"{change:+.0f} %")
    console.print(table)
    console.print(f"batches the batch API was sent: {len(sizes)}, of sizes {sizes}")


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


def slots(args: argparse.Namespace, console: Console) -> None:
    table = Table(title=f"{args.tasks} requests at once to the local model server alone")
    for column in ("slots", "wall s", "output tokens", "tokens/s", "request p50 ms", "request p95 ms"):
        table.add_column(column, justify="right")
    for count in args.slots:
        with tempfile.TemporaryDirectory(prefix="corral-bench-batching-") as tmp, \
                local_model_server(Path(tmp), parallel=count, ctx=1024 * count) as url:
            result = anyio.run(burst, url, args.tasks, args.max_tokens)
        table.add_row(str(count), f"{result['wall_s']:.2f}", str(result["tokens"]),
                      f"{result['tokens'] / result['wall_s']:.0f}", f"{result['latency'].p50_ms:.0f}",
                      f"{result['latency'].p95_ms:.0f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8, help="tasks (and requests) sent at once (default 8)")
    parser.add_argument("--max-tokens", type=int, default=48, help="output cap of each answer (default 48)")
    parser.add_argument("--max-wait-ms", type=float, default=500.0, help="the batched agent's max wait (default 500)")
    parser.add_argument("--slots", type=int, nargs="*", default=[1, 2, 4], help="parallel slots to try (none: skip)")
    args = parser.parse_args()
    console = Console(width=160)
    through_the_pipeline(args, console)
    if args.slots:
        slots(args, console)


if __name__ == "__main__":
    main()
