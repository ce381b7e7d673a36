"""Experiment: two KV compare-and-sets, or one atomic batch of the same two writes?

Starts its own nats-server (from the venv) on a free port of 127.0.0.1, makes a file KV bucket
with atomic batch publish allowed, and runs 64 writers of 300 two-key updates each, first as two
compare-and-sets, then as one atomic batch with a Nats-Expected-Last-Subject-Sequence per key.
Run: `.venv/bin/python docs/design/experiments/atomic_batch.py` (cas|batch, default both).
Figures, with their date and machine: docs/design/0007-measured-and-rejected.md.
"""

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from nats.js.api import KeyValueConfig, StorageType  # noqa: E402

from shared.nats_client import TunedClient  # noqa: E402

WRITERS, UPDATES = 64, 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(mode: str) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as store:
        server = subprocess.Popen([str(Path(sys.executable).parent / "nats-server"), "-a", "127.0.0.1", "-p",
                                   str(port), "-js", "-sd", store], stderr=subprocess.DEVNULL)
        try:
            await asyncio.sleep(0.5)
            nc = TunedClient()
            await nc.connect(f"nats://127.0.0.1:{port}")
            js = nc.jetstream()
            kv = await js.create_key_value(KeyValueConfig(bucket="b", history=1, storage=StorageType.FILE))
            info = await js.stream_info("KV_b")
            info.config.allow_atomic = True
            await js.update_stream(info.config)

            async def batch(writes: list[tuple[str, bytes, int]], batch_id: str) -> dict:
                for n, (key, value, revision) in enumerate(writes, 1):
                    headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n),
                               "Nats-Expected-Last-Subject-Sequence": str(revision)}
                    if n < len(writes):
                        await nc.publish(f"$KV.b.{key}", value, headers=headers)
                    else:
                        headers["Nats-Batch-Commit"] = "1"
                        reply = await nc.request(f"$KV.b.{key}", value, headers=headers, timeout=30)
                        return json.loads(reply.data)
                raise ValueError("empty batch")

            async def writer(w: int) -> None:
                user = tenant = 0
                for i in range(UPDATES):
                    if mode == "cas":
                        user = await kv.update(f"u{w}", b"x" * 300, last=user)
                        tenant = await kv.update(f"t{w}", b"y" * 300, last=tenant)
                    else:
                        ack = await batch([(f"u{w}", b"x" * 300, user), (f"t{w}", b"y" * 300, tenant)], f"b{w}-{i}")
                        if "error" in ack:
                            raise RuntimeError(ack["error"])
                        tenant, user = ack["seq"], ack["seq"] - 1

            started = time.perf_counter()
            await asyncio.gather(*(writer(w) for w in range(WRITERS)))
            print(f"{mode}: {WRITERS * UPDATES / (time.perf_counter() - started):,.0f} two-key updates/s")
            await nc.close()
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    for mode in sys.argv[1:] or ["cas", "batch"]:
        asyncio.run(measure(mode))
