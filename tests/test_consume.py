"""Consuming and observing: a long handler keeps its message; a handler not ready yet gets it again; an
observer sees what is published, in order."""

from __future__ import annotations

import hashlib

import anyio
import msgspec
import pytest
from nats.js.api import StreamConfig

from contracts import DeadLetter, subjects
from shared.bus import Bus
from shared.consume import Consumer, delivery
from shared.errors import NotYet, TransientError
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


async def _publish_and_get_its_dead_letter(bus: Bus, consumer: Consumer, subject: str, data: bytes) -> DeadLetter:
    """Publish `data`, run `consumer` until it writes a dead letter, and return that letter."""
    letters = await bus.nc.subscribe(subjects.dead_letter(bus.service), max_msgs=1)  # before anything is written
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_run_until, consumer, done, 20)
        await bus.js.publish(subject, data)
        msg = await letters.next_msg(timeout=15)
        done.set()
    return msgspec.json.decode(msg.data, type=DeadLetter)


@pytest.mark.parametrize("failure", [ValueError("a bug"), TransientError("still down", retry_after_s=0.05)],
                         ids=["unexpected", "transient"])
async def test_a_handler_that_keeps_failing_is_dead_lettered_on_its_last_delivery_not_dropped(settings, failure):
    twice = settings.with_changes(max_deliver=2)
    async with Bus.connect(twice, "test-consume") as bus:
        await _stream(bus)
        seen: list[int] = []

        async def fails(item: Item) -> None:
            seen.append(delivery())
            raise failure

        consumer = Consumer(bus, STREAM, consumer_config(twice, "fails", "consume.test.fails"),
                            msgspec.json.Decoder(Item).decode, fails)
        letter = await _publish_and_get_its_dead_letter(bus, consumer, "consume.test.fails",
                                                        msgspec.json.encode(Item(n=7)))
        info = await bus.js.consumer_info(STREAM, "fails")
    assert seen == [1, 2]
    assert letter.deliveries == 2 and repr(failure) in letter.reason
    assert letter.payload == msgspec.json.encode(Item(n=7)) and letter.subject == "consume.test.fails"
    assert consumer.stats.dead_lettered == 1
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_whatever_a_decoder_raises_the_message_is_dead_lettered_with_its_reason(settings):
    async with Bus.connect(settings, "test-consume") as bus:
        await _stream(bus)
        handled: list[Item] = []

        async def record(item: Item) -> None:
            handled.append(item)

        consumer = Consumer(bus, STREAM, consumer_config(settings, "deep", "consume.test.deep"),
                            msgspec.json.Decoder(Item).decode, record)
        deep = b'{"n": 1, "extra": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
        letter = await _publish_and_get_its_dead_letter(bus, consumer, "consume.test.deep", deep)
    assert handled == []
    assert letter.reason.startswith("undecodable: JSON nested too deeply")
    assert (letter.payload_size, len(letter.payload)) == (len(deep), 4096) and deep.startswith(letter.payload)
    assert letter.payload_sha256 == hashlib.sha256(deep).hexdigest()
