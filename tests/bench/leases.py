"""What coalescing over replicas adds to a miss: `python -m tests.bench.leases`. It reports; it never asserts.

One process, an embedded nats-server on 127.0.0.1 with file storage. For --misses distinct keys, one after the
other, it times what a miss costs the response cache without a lease (the exact lookup that misses) and with
one (that lookup, the lease's create with its per-message TTL, and its delete once the answer would be
stored), and prints the median and p95 of each and the difference: the price of `coalesce_replicas`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio

from contracts.policy import ResponseCache
from services.stack import nats_server
from services.workers import cache
from services.workers.cache import Request, Store
from services.workers.leases import Leases
from shared.bus import Bus
from shared.config import Settings
from shared.quarantine import Quarantine
from tests.bench.common import percentiles


async def measure(url: str, misses: int) -> dict[str, tuple[float, float]]:
    settings = Settings(nats_url=url)
    policy = ResponseCache(enabled=True, coalesce_replicas=True)
    async with Bus.connect(settings, "bench-leases") as bus:
        kv = await cache.declare(bus.js, settings)
        store, leases = Store(kv, Quarantine(bus.js, "bench-leases")), Leases(kv, "bench")
        plain, leased = [], []
        for n in range(misses):
            request = Request(tenant="bench", agent="a", model="m", digest=f"d{n}", scope="s", text="t")
            started = time.perf_counter()
            await store.get(request, policy)
            plain.append(time.perf_counter() - started)
            request = Request(tenant="bench", agent="a", model="m", digest=f"l{n}", scope="s", text="t")
            started = time.perf_counter()
            await store.get(request, policy)
            revision = await leases.take(request.key, policy.lease_s)
            await leases.give_back(request.key, revision or 0)
            leased.append(time.perf_counter() - started)
    return {name: percentiles(samples)[:2] for name, samples in (("no lease", plain), ("lease", leased))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.leases", description=__doc__.splitlines()[0])
    parser.add_argument("--misses", type=int, default=2_000, help="misses to time (default 2000)")
    args = parser.parse_args(argv)
    if args.misses < 1:
        parser.error("--misses must be at least 1")
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp, nats_server(Path(tmp)) as url:
        figures = anyio.run(measure, url, args.misses)
    for what, (p50, p95) in figures.items():
        print(f"{what:8s} p50 {p50 * 1e3:6.3f} ms, p95 {p95 * 1e3:6.3f} ms per miss ({args.misses:,} misses)")
    added = figures["lease"][0] - figures["no lease"][0]
    print(f"a lease adds {added * 1e3:.3f} ms to a miss at the median (two writes: the create and the delete)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
