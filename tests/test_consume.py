"""Consuming and observing: a long handler keeps its message; a handler not ready yet gets it again; an
observer sees what is published, in order."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.js.api import StreamConfig

from shared.bus import Bus
from shared.consume import Consumer, delivery
from shared.errors import NotYet
from shared.observe import Observer
from shared.streams import consumer_config
from tests.conftest import wait_until

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
        info = await wait_until(lambda: _acked(bus, "slow"))  # acked: it cannot come back
    assert calls == [1]
    assert consumer.stats.redelivered == 0
    assert info.delivered.consumer_seq == 1  # the server delivered it once: never again during the handler


async def _acked(bus: Bus, durable: str):
    """The consumer's info once the server has every message it delivered acknowledged; None until then."""
    info = await bus.js.consumer_info(STREAM, durable)
    return info if (info.num_ack_pending, info.num_pending) == (0, 0) else None


async def test_an_observer_sees_events_as_they_are_published_and_skips_one_it_cannot_decode(settings):
    async with Bus.connect(settings, "test-observe") as bus:
        await _stream(bus)
        seen: list[int] = []
        done = anyio.Event()

        async def record(item: Item) -> None:
            seen.append(item.n)
            if len(seen) == 300:
                done.set()

        observer = Observer(bus, "items", ["consume.test.observed"], msgspec.json.Decoder(Item).decode, record)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(observer.run, stop)
            with anyio.fail_after(5):
                await observer.subscribed.wait()  # the same connection publishes: the server has the SUBs first
            await bus.js.publish("consume.test.observed", b"{not an item")
            for n in range(300):
                await bus.js.publish("consume.test.observed", msgspec.json.encode(Item(n=n)))
            with anyio.fail_after(10):
                await done.wait()
            stop.set()
    assert seen == list(range(300))
    assert (observer.stats.undecodable, observer.stats.handled) == (1, 300)


async def test_a_handler_that_is_not_ready_yet_gets_its_message_again_and_knows_which_delivery_it_is(settings):
    async with Bus.connect(settings, "test-consume") as bus:
        await _stream(bus)
        seen: list[int] = []
        done = anyio.Event()

        async def waits_twice(item: Item) -> None:
            seen.append(delivery())
            if delivery() < 3:
                raise NotYet("not yet", retry_after_s=0.05)
            done.set()

        config = consumer_config(settings, "later", "consume.test.later")
        consumer = Consumer(bus, STREAM, config, msgspec.json.Decoder(Item).decode, waits_twice)
        await bus.js.publish("consume.test.later", msgspec.json.encode(Item(n=1)))
        await _run_until(consumer, done, timeout_s=10)
        info = await bus.js.consumer_info(STREAM, "later")
    assert seen == [1, 2, 3]
    assert (consumer.stats.retried, consumer.stats.handled, consumer.stats.dead_lettered) == (2, 1, 0)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
