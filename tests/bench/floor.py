"""The raw floor: the pipeline's JetStream hops, each with an empty handler.

A task passes eight durable consumers: five on its main path (guard, budget,
executor, worker, executor again) and three beside it that only take note (the
breaker and the budget's usage consumer read every step outcome, the budget's
release consumer every task end). The floor has the same eight, each its own OS
process: chain hop i consumes `bench.hop.i` and publishes on to `bench.hop.{i+1}`;
side hops consume the subject their pipeline twin reads (step outcomes are
`bench.hop.4`, task ends `bench.hop.5`) and only ack. The driver publishes into
hop 0 and listens to `bench.hop.5`.

Everything a real hop pays for the transport is kept: the services' own connection
(shared/nats_client.py), file storage, a Nats-Msg-Id per publish (the streams
deduplicate), ~600-byte messages, fetching batches for at most `concurrency`
handler tasks (shared.consume.HandlerTasks), the publish awaited on its PubAck,
then the ack. Nothing else is: no decoding, no tracing, no KV, no monitor. It is
measured ROUNDS times and the fastest round is kept: on a machine whose speed
wanders, that is the floor least kind to the pipeline's ratio.

Run a hop with `python -m tests.bench.floor --hop I --nats URL` (chain) or
`--side NAME` (beside it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import uuid
from pathlib import Path

import anyio
import nats
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from services.stack import Process
from shared.config import Settings, load_settings
from shared.consume import HandlerTasks
from shared.nats_client import TunedClient
from shared.runtime import tune_gc
from shared.streams import consumer_config
from tests.bench.common import ISOLATED_ENV, WARMUP_IDLE_S, Measured, drive, sampled, warm_up_failed

STREAM = "BENCH_FLOOR"
CHAIN = 5  # the main path: guard, budget, executor, worker, executor
SIDE = {"breaker": 4, "budget-usage": 4, "budget-release": CHAIN}
"""Consumers beside the main path -> the chain subject they read (step outcomes, task ends)."""
HOPS = CHAIN + len(SIDE)
PAYLOAD = b'{"kind":"bench.hop","pad":"' + b"x" * 570 + b'"}'  # ~600 bytes, like a task event
ID_HEADER = "Bench-Id"
MSG_ID_HEADER = "Nats-Msg-Id"
FETCH_TIMEOUT_S = 1.0  # as shared.consume
WARMUP_MESSAGES = 50
ROUNDS = 2
REPO = Path(__file__).resolve().parents[2]


def subject(hop: int) -> str:
    return f"bench.hop.{hop}"


def durable(hop: int | str) -> str:
    return f"bench-hop-{hop}"


def _hop_args() -> list[tuple[str, list[str]]]:
    """(process name, its hop arguments) of every hop: the chain, then the side hops."""
    return ([(f"floor-hop-{i}", ["--hop", str(i)]) for i in range(CHAIN)]
            + [(f"floor-side-{name}", ["--side", name]) for name in SIDE])


# --- the driver ----------------------------------------------------------------


def run(nats_url: str, log_dir: Path, messages: int, concurrency: int, idle_timeout_s: float) -> Measured:
    """Declare the floor stream, start the hops, drive `messages` through, stop the hops (always)."""
    anyio.run(_declare_stream, nats_url, backend_options={"use_uvloop": True})
    # The hops are `tests.*` modules, not installed: run them from the repository.
    env = {**ISOLATED_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    hops = [Process(name, [sys.executable, "-m", "tests.bench.floor", *args, "--nats", nats_url],
                    log_dir / f"{name}.log", env=env) for name, args in _hop_args()]
    try:
        return anyio.run(_measure, nats_url, hops, messages, concurrency, idle_timeout_s,
                         backend_options={"use_uvloop": True})
    finally:
        for hop in hops:
            hop.stop()


async def _declare_stream(nats_url: str) -> None:
    settings = Settings()
    nc = await nats.connect(nats_url, name="bench-floor")
    try:
        await nc.jetstream().add_stream(StreamConfig(
            name=STREAM, subjects=["bench.hop.>"], storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS, duplicate_window=settings.dedup_window_s, num_replicas=1))
    finally:
        await nc.close()


async def _measure(nats_url: str, hops: list[Process], messages: int, concurrency: int,
                   idle_timeout_s: float) -> Measured:
    nc = TunedClient()  # as the pipeline's driver
    await nc.connect(nats_url, name="bench-floor", pending_size=64 * 1024 * 1024)
    js = nc.jetstream(timeout=10)
    send, arrivals = anyio.create_memory_object_stream[tuple[str, str]](max_buffer_size=1_000_000)

    async def on_out(msg: Msg) -> None:
        send.send_nowait((msg.headers[ID_HEADER], "out"))

    async def publish(key: str) -> None:
        await js.publish(subject(0), PAYLOAD, headers={MSG_ID_HEADER: f"{key}:0", ID_HEADER: key})

    async def receive() -> tuple[str, str]:
        return await arrivals.receive()

    sub = await nc.subscribe(subject(CHAIN), cb=on_out, pending_msgs_limit=1_000_000)
    try:
        await _wait_for_hops(js)
        # The warm-up also proves the chain runs: nothing comes out unless all of it does.
        warm = await drive(_ids(WARMUP_MESSAGES), publish, receive, concurrency, WARMUP_IDLE_S)
        if warm_up_failed(warm):
            raise RuntimeError(f"no floor warm-up message came through; see {hops[0].log_path.parent}")
        best = None
        for _ in range(ROUNDS):  # the fastest round: a floor measured low would flatter the pipeline
            ids = _ids(messages)
            round_ = await sampled({hop.name: hop.pid for hop in hops}, " (floor run)",
                                   lambda: drive(ids, publish, receive, concurrency, idle_timeout_s))
            if best is None or round_[0].per_s > best[0].per_s:
                best = round_
        result, sampler, server_msgs = best
    finally:
        await sub.unsubscribe()
        await nc.close()
    return Measured(result=result, processes=sampler.stats(), other_cpu_s=sampler.other_cpu_s(),
                    server_msgs=server_msgs, crashed=[hop.name for hop in hops if not hop.alive()])


async def _wait_for_hops(js, timeout_s: float = 30.0) -> None:
    """Until every hop has declared its durable consumer (its process is up)."""
    with anyio.fail_after(timeout_s):
        for hop in [*range(CHAIN), *SIDE]:
            while True:
                try:
                    await js.consumer_info(STREAM, durable(hop))
                    break
                except NotFoundError:
                    await anyio.sleep(0.1)


def _ids(count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"floor-{run}-{n:06d}" for n in range(count)]


# --- one hop (its own process) -------------------------------------------------------


async def hop_main(hop: int | str, settings: Settings) -> None:
    """Consume one hop until SIGTERM/SIGINT: a chain hop (int) forwards every message, a side hop
    (the name of its pipeline twin) only acks it."""
    nc = TunedClient()  # the services' connection: the floor gets every transport gain they get
    await nc.connect(settings.nats_url, name=durable(hop), pending_size=64 * 1024 * 1024)
    js = nc.jetstream(timeout=10)
    on_chain = isinstance(hop, int)
    reads, writes = (hop, hop + 1) if on_chain else (SIDE[hop], None)
    config = consumer_config(settings, durable(hop), subject(reads))
    await js.add_consumer(STREAM, config)
    sub = await js.pull_subscribe_bind(config.durable_name, STREAM)

    async def forward(msg: Msg) -> None:  # the empty handler: publish on, then ack
        try:
            key = msg.headers[ID_HEADER]
            await js.publish(subject(writes), msg.data, headers={MSG_ID_HEADER: f"{key}:{writes}", ID_HEADER: key})
            await msg.ack()
        except NatsTimeout:
            await msg.nak()  # not stored downstream: let it come again, as the real loop would

    async def note(msg: Msg) -> None:  # the empty handler of a consumer beside the path
        await msg.ack()

    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_signal, tg.cancel_scope)
        await _fetch_loop(sub, HandlerTasks(settings.concurrency), forward if on_chain else note)
    await nc.close()


async def _fetch_loop(sub, handlers: HandlerTasks, handle) -> None:
    """The loop of shared.consume.Consumer._loop: fetch what there is room for, handle each concurrently."""
    try:
        while True:
            await handlers.room()
            try:
                msgs = await sub.fetch(handlers.free, timeout=FETCH_TIMEOUT_S)
            except (NatsTimeout, TimeoutError):
                continue
            for msg in msgs:
                handlers.spawn(handle(msg))
    finally:
        handlers.cancel()


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async for _ in received:
            scope.cancel()
            return


def main() -> None:
    parser = argparse.ArgumentParser(description="One hop of the benchmark's raw floor.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--hop", type=int, choices=range(CHAIN), help=f"a hop of the chain, 0..{CHAIN - 1}")
    which.add_argument("--side", choices=sorted(SIDE), help="a hop beside the chain, named after its pipeline twin")
    parser.add_argument("--nats", required=True, help="NATS URL")
    args = parser.parse_args()
    # Same settings source as the services, so CORRAL_CONCURRENCY etc. apply to both.
    settings = load_settings().with_changes(nats_url=args.nats)
    tune_gc()  # as every service process does
    anyio.run(hop_main, args.side if args.hop is None else args.hop, settings, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
