"""The consume loop's modes: a long handler keeps its message, an inline handler sees every message in order."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.js.api import StreamConfig

from shared.bus import Bus
from shared.consume import Consumer
from shared.streams import consumer_config

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

STREAM = "TEST_CONSUME"


class Item(msgspec.Struct):
    n: int


async def _stream(bus: Bus) -> None:
    await bus.js.add_stream(StreamConfig(name=STREAM, subjects=["consume.test.>"]))


async def _run_until(consumer: Consumer, done: anyio.Event, timeout_s: float) -> None:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run, stop)
        with anyio.fail_after(timeout_s):
            await done.wait()
        stop.set()


async def test_a_handler_running_longer_than_the_ack_wait_keeps_its_message_and_runs_once(settings):
    async with Bus.connect(settings, "test-consume") as bus:
        await _stream(bus)
        calls: list[int] = []
        done = anyio.Event()

        async def slow(item: Item) -> None:
            calls.append(item.n)
            await anyio.sleep(3.5)  # three and a half times the ack wait
            done.set()

        config = consumer_config(settings, "slow", "consume.test.slow", ack_wait_s=1.0)
        consumer = Consumer(bus, STREAM, config, msgspec.json.Decoder(Item).decode, slow, long_running=True)
        await bus.js.publish("consume.test.slow", msgspec.json.encode(Item(n=1)))
        await _run_until(consumer, done, timeout_s=10)
        await anyio.sleep(1.5)  # past another ack wait: an unacked message would be back by now
        info = await bus.js.consumer_info(STREAM, "slow")
    assert calls == [1]
    assert consumer.stats.redelivered == 0
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_an_inline_consumer_without_acks_handles_every_message_in_stream_order(settings):
    async with Bus.connect(settings, "test-consume") as bus:
        await _stream(bus)
        seen: list[int] = []
        done = anyio.Event()

        async def record(item: Item) -> None:
            seen.append(item.n)
            if len(seen) == 300:
                done.set()

        for n in range(300):
            await bus.js.publish("consume.test.inline", msgspec.json.encode(Item(n=n)))
        config = consumer_config(settings, "inline", "consume.test.inline", acks=False)
        consumer = Consumer(bus, STREAM, config, msgspec.json.Decoder(Item).decode, record, inline=True)
        await _run_until(consumer, done, timeout_s=10)
    assert seen == list(range(300))
