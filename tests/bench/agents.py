"""Agent benchmark: `python -m tests.bench.agents`. It reports; it never asserts.

Every service runs as its own OS process on an embedded nats-server at 127.0.0.1, with one
agent kind on the `local` provider: llama.cpp's server (services.local_model) serving
SmolLM2-135M on this machine's CPU. Tasks go one at a time, so nothing queues.

1. Corral's added latency per model call: from the executor's StepRequested to the worker's
   StepCompleted (their `occurred_at`), minus the model call's own time as the worker timed it
   (`StepCompleted.calls`). What is left is the bus, the worker's loop and its bookkeeping.
2. Submission to step request: the guard's, the budget's and the executor's part (clocks of one machine).
3. Time to first token, through Corral (the task's submission to the first `streaming` progress
   the client hears) and straight to the server (an HTTP request to its first streamed delta),
   alternated, with prompts of the same length and the same output cap.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anyio
import httpx
import msgspec
from rich.console import Console
from rich.table import Table

from contracts import StepCompleted, StepRequested, TaskCompleted, TaskFailed, TaskProgress, TaskRejected, TaskSpec
from contracts.policy import DEFAULT_POLICY, AgentPolicy, BudgetLimits, Defaults, RateLimit
from services.client import Client
from services.local_model import local_model_server
from services.monitor.handlers import percentiles
from services.stack import LOCAL_MODEL, LOCAL_STRATEGY, Services, nats_server
from shared.config import Settings
from shared.policy import apply_policy
from tests.bench.common import ISOLATED_ENV
from tests.signals import Signals, signals

AGENT = "assistant"
PROMPT = "In one sentence: what is a message queue?"
ROOMY = RateLimit(requests_per_minute=6_000, tokens_per_minute=10_000_000, burst_requests=1_000,
                  burst_tokens=1_000_000)


def bench_policy():
    return msgspec.structs.replace(
        DEFAULT_POLICY, description="bench: one agent on the local model",
        defaults=Defaults(rate=ROOMY, tenant_rate=ROOMY,
                          budget=BudgetLimits(daily_tokens=10**9, hourly_tokens=10**9),
                          tenant_budget=BudgetLimits(daily_tokens=10**9, hourly_tokens=10**9)),
        agents={AGENT: AgentPolicy(chain=[LOCAL_STRATEGY])})


async def through_corral(client: Client, events, heard: Signals, n: int,
                         max_tokens: int) -> tuple[float, float | None, float, float | None]:
    """(added ms of its step, ms from submission to the first streamed piece, ms from submission to its step
    request, ms from the worker taking the step to its first token) of one task."""
    first_piece: float | None = None
    started, submitted_at = time.perf_counter(), time.time()
    task_id = await client.submit(TaskSpec(agent=AGENT, prompt=f"{PROMPT} (c{n})", max_tokens=max_tokens),
                                  tenant="default", user="bench")
    async for event in events:
        if getattr(event, "task_id", None) != task_id:
            continue
        if isinstance(event, TaskProgress) and event.stage == "streaming" and first_piece is None:
            first_piece = (time.perf_counter() - started) * 1000
        elif isinstance(event, TaskCompleted):
            break
        elif isinstance(event, TaskFailed | TaskRejected):
            raise RuntimeError(f"task {task_id} did not complete: {event}")
    completed = await heard.first(StepCompleted, task_id=task_id)
    requested = next(e for e in heard.of(StepRequested, task_id=task_id) if e.step_id == completed.step_id)
    model_ms = sum(call.latency_ms for call in completed.calls or [])
    step_ms = (completed.occurred_at - requested.occurred_at).total_seconds() * 1000
    admitted_ms = (requested.occurred_at.timestamp() - submitted_at) * 1000
    return step_ms - model_ms, first_piece, admitted_ms, completed.first_token_ms


async def straight(url: str, n: int, max_tokens: int) -> float:
    """ms from sending a streamed chat request to the local server to its first text delta."""
    body = {"model": LOCAL_MODEL, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"{PROMPT} (d{n})"}]}
    async with httpx.AsyncClient(timeout=60) as http:
        started = time.perf_counter()
        async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):  # the first piece of text, as Corral's
                        return (time.perf_counter() - started) * 1000
    raise RuntimeError("the local server streamed no text")


async def measure(settings: Settings, url: str, tasks: int, max_tokens: int, services: list[str]) -> dict:
    added, corral_ttft, direct_ttft, admission, worker_ttft = [], [], [], [], []
    async with Client.connect(settings, "bench") as client:
        await apply_policy(await client.bus.policy_bucket(), bench_policy())
        await client.wait_ready(services, timeout=60)
        async with client.events() as events, signals(client) as heard:
            for n in range(-2, tasks):  # two warm-up rounds
                # Alternated, with prompts of their own: neither path finds the other's prompt in the server's cache.
                if n % 2:
                    direct = await straight(url, n, max_tokens)
                step_ms, ttft, admitted_ms, in_worker = await through_corral(client, events, heard, n, max_tokens)
                if not n % 2:
                    direct = await straight(url, n, max_tokens)
                if n >= 0:
                    added.append(step_ms)
                    admission.append(admitted_ms)
                    if in_worker is not None:
                        worker_ttft.append(in_worker)
                    direct_ttft.append(direct)
                    if ttft is not None:
                        corral_ttft.append(ttft)
    return {"added": percentiles(added), "admission": percentiles(admission), "corral_ttft": percentiles(corral_ttft),
            "direct_ttft": percentiles(direct_ttft), "worker_ttft": percentiles(worker_ttft), "streamed": len(corral_ttft), "tasks": tasks}


def report(result: dict, console: Console) -> None:
    table = Table(title=f"Agents on the local model ({result['tasks']} tasks, one at a time)")
    for column in ("measure", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    rows = (("Corral's added latency per model call (step requested → completed, minus the call)", "added"),
            ("submission → step requested (guard, budget, executor)", "admission"),
            ("time to first token, through Corral (submit → first streamed piece)", "corral_ttft"),
            ("  of which in the worker (step taken → first token)", "worker_ttft"),
            ("time to first token, straight to the server", "direct_ttft"))
    for label, key in rows:
        table.add_row(label, f"{result[key].p50_ms:.1f}", f"{result[key].p99_ms:.1f}")
    console.print(table)
    if result["streamed"] < result["tasks"]:
        console.print(f"{result['tasks'] - result['streamed']} task(s) streamed nothing before their end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20, help="measured tasks (after two warm-ups)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output cap of each answer")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-agents-") as tmp:
        data_dir = Path(tmp)
        with nats_server(data_dir) as nats_url, local_model_server(data_dir / "logs") as model_url:
            services = Services(nats_url, data_dir / "logs", agents=(AGENT,),
                                env={**ISOLATED_ENV, "CORRAL_LOCAL_MODEL_URL": model_url})
            services.start()
            try:
                settings = Settings(nats_url=nats_url)
                result = anyio.run(measure, settings, model_url, args.tasks, args.max_tokens, services.names())
            finally:
                services.stop()
    report(result, Console())
    if args.json:
        args.json.write_text(json.dumps({k: msgspec.to_builtins(v) for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
