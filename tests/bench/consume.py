"""`python -m tests.bench.consume`: what the kit itself costs per message, publishing and consuming.

One process, an embedded nats-server on 127.0.0.1. First --messages events are
published to a stream, 64 in flight at a time, each awaited on its PubAck (the path of every
emit and KV write); then one `shared.consume.Consumer` with an empty handler takes
them all (fetch, decode, trace context, ack). Reported for each: the process's CPU
per message and messages per second. It reports and asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import msgspec
from nats.js.api import StreamConfig

from services.stack import nats_server
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer
from shared.streams import consumer_config

STREAM, SUBJECT = "BENCH_CONSUME", "bench.consume.x"
PUBLISHERS = 64  # publishes in flight at once


class Item(msgspec.Struct):
    n: int
    pad: str = ""


async def measure(nats_url: str, messages: int) -> dict[str, tuple[float, float]]:
    """"publish" and "consume" -> (CPU µs per message, messages per second)."""
    settings = Settings(nats_url=nats_url)
    async with Bus.connect(settings, "bench-consume") as bus:
        await bus.js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT]))
        cpu, wall = time.process_time(), time.perf_counter()
        numbers = iter(range(messages))

        async def publisher() -> None:  # PUBLISHERS of these share the numbers: no task per publish
            for n in numbers:
                await bus.js.publish(SUBJECT, msgspec.json.encode(Item(n=n, pad="x" * 500)))

        async with anyio.create_task_group() as tg:
            for _ in range(PUBLISHERS):
                tg.start_soon(publisher)
        figures = {"publish": _per_message(cpu, wall, messages)}
        handled, done, stop = 0, anyio.Event(), anyio.Event()

        async def empty(_: Item) -> None:
            nonlocal handled
            handled += 1
            if handled == messages:
                done.set()

        consumer = Consumer(bus, STREAM, consumer_config(settings, "bench-consume", SUBJECT),
                            msgspec.json.Decoder(Item).decode, empty)
        cpu, wall = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.run, stop)
            with anyio.fail_after(120):
                await done.wait()
            figures["consume"] = _per_message(cpu, wall, messages)
            stop.set()
    return figures


def _per_message(cpu_start: float, wall_start: float, messages: int) -> tuple[float, float]:
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    return cpu / messages * 1e6, messages / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.consume", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000, help="messages to consume (default 30000)")
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp, nats_server(Path(tmp)) as url:
        figures = anyio.run(measure, url, args.messages, backend_options={"use_uvloop": True})
    for what, (cpu_us, rate) in figures.items():
        print(f"{what:8s} {cpu_us:5.1f} µs CPU per message, {rate:7,.0f} messages/s ({args.messages:,} messages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
