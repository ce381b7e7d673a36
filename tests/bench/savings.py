"""Savings benchmark: `python -m tests.bench.savings`. It reports; it never asserts.

One workload, run through the whole pipeline once per configuration: every service its own OS process on an
embedded nats-server, each configuration an agent kind of its own (its own worker process, its own cache
keys), all on the SIMULATED provider (deterministic answers, real token counts, the policy's simulated
prices; its latency is the stack's default). The workload (seeded) mixes repeated questions, paraphrases of
them, simple and complex one-off tasks, long chat histories and bursts (one new question asked by several
at once), submitted a few at a time, so identical requests are sometimes in flight together.

Configurations: nothing; the exact cache; exact and semantic; coalescing alone (no stored answers); tiering;
tiering with its embedding classifier; compaction; everything. For each: tokens billed, cost, hits by source, tokens saved, latency of a task
(submission to its end, as the client sees it). Then the semantic cache's precision and recall on the
committed evaluation set (tests/data/semantic_cache_eval.json) at the configured threshold, with the real
embedding model, and the tiering classifier's accuracy on its evaluation set (tests/data/tiering_eval.json,
short prompts the rules alone send to the fast tier). Batching needs a provider with a batch API, which the simulated one is not:
`python -m tests.bench.batching` measures it on the local model.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from contracts import ChatMessage, StepCompleted, TaskCompleted, TaskSpec
from contracts.policy import (
    ADVANCED,
    DEFAULT_POLICY,
    FAST,
    AgentPolicy,
    BudgetLimits,
    Compaction,
    Defaults,
    Limits,
    RateLimit,
    ResponseCache,
    Tiering,
)
from services.client import Client
from services.monitor.handlers import percentiles
from services.stack import Services, nats_server
from shared.config import Settings
from shared.policy import apply_policy
from tests.bench.common import ISOLATED_ENV
from tests.conftest import wait_until
from tests.signals import signals

EVAL = Path(__file__).resolve().parents[1] / "data" / "semantic_cache_eval.json"
TIERING_EVAL = EVAL.with_name("tiering_eval.json")
ROOMY = RateLimit(requests_per_minute=1e6, tokens_per_minute=1e9, burst_requests=100_000, burst_tokens=10**9)
PLENTY = BudgetLimits(daily_tokens=10**12, hourly_tokens=10**12)
CACHE = ResponseCache(enabled=True, coalesce=False)
CONFIGS: dict[str, dict] = {
    "off": {},
    "exact": {"cache": CACHE},
    "exact+semantic": {"cache": msgspec.structs.replace(CACHE, semantic=True)},
    "coalescing": {"cache": ResponseCache(enabled=True, coalesce=True, store_answers=False)},
    "tiering": {"tiering": Tiering(enabled=True)},
    "tiering+classifier": {"tiering": Tiering(enabled=True, classify=True)},
    "compaction": {"compaction": Compaction(enabled=True, history_tokens=600, keep_turns=2)},
    "all": {"cache": ResponseCache(enabled=True, semantic=True, coalesce=True), "tiering": Tiering(enabled=True),
            "compaction": Compaction(enabled=True, history_tokens=600, keep_turns=2)},
}
COMPLEX = ["Design a sharded storage layout for {x}", "Analyse the failure modes of {x}",
           "Plan the migration of {x} to a new region", "Refactor the architecture of {x} for scale"]
BURST = 6
THINGS = ["the billing service", "the search index", "the order pipeline", "the user directory", "the audit log",
          "the message bus", "the report generator", "the payment gateway", "the image store", "the rate limiter"]


def bench_policy(agents: dict[str, AgentPolicy]):
    return msgspec.structs.replace(
        DEFAULT_POLICY, description="bench: savings", agents=agents,
        defaults=Defaults(rate=ROOMY, tenant_rate=ROOMY, budget=PLENTY, tenant_budget=PLENTY),
        limits=Limits(max_messages=64, max_request_tokens=64_000))


def agent_name(config: str) -> str:
    return "save-" + config.replace("+", "-")


def workload(size: int, seed: int) -> list[tuple[str, TaskSpec]]:
    """(kind, spec) in submission order, the agent left to fill in."""
    rng = random.Random(seed)
    pairs = json.loads(EVAL.read_text())["pairs"]
    paraphrases = [p for p in pairs if p["kind"] == "paraphrase"]
    questions = [p["a"] for p in paraphrases]
    tasks: list[tuple[str, TaskSpec]] = []
    n = 0
    while len(tasks) < size:
        n += 1
        draw = rng.random()
        if draw < 0.04:  # a burst: one new question asked by many at once (after an announcement, say)
            burst = TaskSpec(agent="x", prompt=f"What changed in release {n} of the platform?")
            tasks.extend(("burst", burst) for _ in range(min(BURST, size - len(tasks))))
        elif draw < 0.30:  # a popular question again (a few are asked most)
            tasks.append(("repeated", TaskSpec(agent="x", prompt=questions[min(int(rng.paretovariate(1.2)) - 1,
                                                                                 len(questions) - 1)])))
        elif draw < 0.45:
            tasks.append(("paraphrase", TaskSpec(agent="x", prompt=rng.choice(paraphrases)["b"])))
        elif draw < 0.70:
            tasks.append(("simple", TaskSpec(agent="x", prompt=f"In one line: what is item {n} of the catalogue?")))
        elif draw < 0.85:
            text = rng.choice(COMPLEX).format(x=rng.choice(THINGS)) + f" (case {n})"
            tasks.append(("complex", TaskSpec(agent="x", prompt=text)))
        else:
            history = [ChatMessage(role="user" if i % 2 == 0 else "assistant",
                                   content=f"Turn {i} of case {n}: " + "we discussed the design at length " * 12)
                       for i in range(rng.randint(8, 16))]
            tasks.append(("chat", TaskSpec(agent="x", messages=history, prompt=f"So what do we do about case {n}?")))
    return tasks


async def run_config(client: Client, agent: str, tasks: list[tuple[str, TaskSpec]], concurrency: int) -> dict:
    latencies: list[float] = []
    completed: set[str] = set()
    limiter = anyio.Semaphore(concurrency)
    async with signals(client) as heard:
        async def one(spec: TaskSpec) -> None:
            async with limiter:
                started = time.perf_counter()
                done = await client.run(msgspec.structs.replace(spec, agent=agent), tenant="default", user="bench")
                if isinstance(done, TaskCompleted):
                    latencies.append((time.perf_counter() - started) * 1000)
                    completed.add(done.task_id)

        async with anyio.create_task_group() as tg:
            for _, spec in tasks:
                tg.start_soon(one, spec)

        async def every_answer_heard() -> bool:  # each completed task's answering step reached the subscription
            return completed <= {e.task_id for e in heard.of(StepCompleted)}

        await wait_until(every_answer_heard, timeout=30)
        steps = [e for e in heard.of(StepCompleted) if e.agent == agent]
    return summarise(steps, latencies, len(tasks))


def summarise(steps: list[StepCompleted], latencies: list[float], tasks: int) -> dict:
    prices = DEFAULT_POLICY
    hits = Counter(s.cache.source for s in steps if s.cache)
    return {
        "tasks": tasks, "completed": len(latencies),
        "input_tokens": sum(s.usage.input_tokens for s in steps),
        "output_tokens": sum(s.usage.output_tokens for s in steps),
        "cost_usd": sum(prices.price_of(s.model).cost(s.usage) for s in steps),
        "hits": dict(hits), "saved_tokens": sum(max(0, s.cache.saved.total - s.usage.total) for s in steps if s.cache),
        "compacted": sum((s.compaction.tokens_before - s.compaction.tokens_after) for s in steps if s.compaction),
        "fast_steps": sum(1 for s in steps if s.model == FAST.model),
        "latency": msgspec.to_builtins(percentiles(latencies)),
        "step_latency": msgspec.to_builtins(percentiles([s.latency_ms for s in steps])),
    }


def semantic_quality(threshold: float) -> dict:
    """Precision and recall of the semantic cache on the evaluation set, as the worker decides a hit."""
    from services.workers.cache import describe
    from services.workers.conversation import Turn
    from services.workers.semantic import Index
    from shared.embeddings import Embedder
    from tests.test_caching import step_of

    embedder = Embedder()
    served = Counter()
    for pair in json.loads(EVAL.read_text())["pairs"]:
        a, b = embedder._offline(pair["a"]), embedder._offline(pair["b"])
        first = describe(step_of("default", "x"), [Turn(role="user", content=pair["a"])], [])
        second = describe(step_of("default", "x"), [Turn(role="user", content=pair["b"])], [])
        index = Index(lambda tenant, agent: 10)
        index.add(first.key, "default", "cached", first.scope, a, first.text)
        hit = index.match(second, b, threshold) is not None
        served[(pair["kind"] == "paraphrase", hit)] += 1
        similarity = float(a @ b)
        served[("similar", pair["kind"] == "paraphrase")] += similarity >= threshold
    tp, fp, fn = served[(True, True)], served[(False, True)], served[(True, False)]
    return {"threshold": threshold, "paraphrases": tp + fn, "near_misses": served[(False, False)] + fp,
            "true_hits": tp, "false_hits": fp, "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "near_misses_above_threshold": served[("similar", False)]}


def classifier_quality() -> dict[str, tuple[int, int]]:
    """Per tier of the evaluation set: (prompts the classifier put there, prompts)."""
    from shared.tiering import Classifier

    async def measure_all() -> dict[str, tuple[int, int]]:
        classifier, rules = Classifier(), Tiering(enabled=True, classify=True)
        found = {}
        for label, prompts in json.loads(TIERING_EVAL.read_text()).items():
            if label in ("fast", "advanced"):
                found[label] = (sum([await classifier.classify(rules, text) == label for text in prompts]),
                                len(prompts))
        return found

    return anyio.run(measure_all)


def report(results: dict[str, dict], quality: dict, console: Console) -> None:
    base = results["off"]
    table = Table(title=f"Savings on one workload ({base['tasks']} tasks, simulated models and prices)")
    for column in ("configuration", "tokens in", "tokens out", "cost", "vs off", "hits (exact/sem/coal)",
                   "tokens saved", "compacted", "fast steps", "p50 ms", "p95 ms", "step p50 ms"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, r in results.items():
        hits = "/".join(str(r["hits"].get(k, 0)) for k in ("exact", "semantic", "coalesced"))
        change = (r["cost_usd"] / base["cost_usd"] - 1) * 100 if base["cost_usd"] else 0.0
        table.add_row(name, f"{r['input_tokens']:,}", f"{r['output_tokens']:,}", f"${r['cost_usd']:.4f}",
                      f"{change:+.0f} %", hits, f"{r['saved_tokens']:,}", f"{r['compacted']:,}",
                      str(r["fast_steps"]), f"{r['latency']['p50_ms']:.0f}", f"{r['latency']['p95_ms']:.0f}",
                      f"{r['step_latency']['p50_ms']:.0f}")
    console.print(table)
    console.print(f"semantic cache on the evaluation set at similarity {quality['threshold']}: precision "
                  f"{quality['precision']:.2f}, recall {quality['recall']:.2f} ({quality['true_hits']} of "
                  f"{quality['paraphrases']} paraphrases served, {quality['false_hits']} of {quality['near_misses']} "
                  f"near-misses served; {quality['near_misses_above_threshold']} near-misses were above the "
                  f"similarity threshold and refused by the salient-token check)")
    classes = classifier_quality()
    console.print("tiering classifier on its evaluation set: " + ", ".join(
        f"{right} of {total} {label} prompts put on the {label} tier" for label, (right, total) in classes.items()))


async def measure(settings: Settings, tasks: list, concurrency: int, names: list[str]) -> dict[str, dict]:
    agents = {agent_name(c): AgentPolicy(chain=[ADVANCED, FAST], default_output_tokens=128, **o)
              for c, o in CONFIGS.items()}
    results = {}
    async with Client.connect(settings, "bench") as client:
        version = await apply_policy(await client.bus.policy_bucket(), bench_policy(agents))
        await client.wait_ready(names, timeout=60)
        await client.wait_policy(version, names)
        for config in CONFIGS:
            results[config] = await run_config(client, agent_name(config), tasks, concurrency)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200, help="tasks in the workload (default 200)")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks in flight at once (default 8)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run these configurations only")
    args = parser.parse_args()
    for name in set(CONFIGS) - set(args.only or CONFIGS) - {"off"}:
        CONFIGS.pop(name)
    tasks = workload(args.tasks, args.seed)
    with tempfile.TemporaryDirectory(prefix="corral-bench-savings-") as tmp:
        data_dir = Path(tmp)
        with nats_server(data_dir) as nats_url:
            services = Services(nats_url, data_dir / "logs", agents=[agent_name(c) for c in CONFIGS],
                                env=ISOLATED_ENV)
            services.start()
            try:
                results = anyio.run(measure, Settings(nats_url=nats_url), tasks, args.concurrency, services.names())
            finally:
                services.stop()
    quality = semantic_quality(ResponseCache(semantic=True).similarity)
    report(results, quality, Console(width=160))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "semantic": quality}, indent=2))


if __name__ == "__main__":
    main()
