"""The bus's tuned connection batches writes and times requests itself; nothing may be lost,
reordered or left waiting by that."""

from __future__ import annotations

import anyio
import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NoStreamResponseError

from shared.bus import Bus
from shared.nats_client import TunedClient, TunedJetStream

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_commands_from_many_tasks_all_arrive_and_each_tasks_stay_in_order(settings):
    async with Bus.connect(settings, "test-bus") as bus:
        assert isinstance(bus.nc, TunedClient)
        received: list[bytes] = []
        done = anyio.Event()

        async def on_msg(msg) -> None:
            received.append(msg.data)
            if len(received) == 20 * 100:
                done.set()

        await bus.nc.subscribe("bus.test", cb=on_msg, pending_msgs_limit=100_000)

        async def publisher(n: int) -> None:
            for i in range(100):
                await bus.nc.publish("bus.test", f"{n}:{i}".encode())
                if i % 10 == 0:
                    await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(publisher, n)
        with anyio.fail_after(10):
            await done.wait()
    for n in range(20):
        mine = [int(m.split(b":")[1]) for m in received if m.startswith(f"{n}:".encode())]
        assert mine == list(range(100))


async def test_concurrent_requests_each_get_their_own_reply_and_leave_nothing_waiting(settings):
    async with Bus.connect(settings, "test-bus") as bus:
        async def echo(msg) -> None:
            await msg.respond(b"re:" + msg.data)

        await bus.nc.subscribe("bus.echo", cb=echo)
        replies: dict[int, bytes] = {}

        async def ask(n: int) -> None:
            replies[n] = (await bus.nc.request("bus.echo", str(n).encode(), timeout=5)).data

        async with anyio.create_task_group() as tg:
            for n in range(500):
                tg.start_soon(ask, n)
        assert replies == {n: f"re:{n}".encode() for n in range(500)}
        assert bus.nc._resp_map == {}


async def test_a_request_nobody_answers_times_out_and_is_forgotten(settings):
    async with Bus.connect(settings, "test-bus") as bus:
        async def silent(msg) -> None:
            pass

        await bus.nc.subscribe("bus.silent", cb=silent)
        with pytest.raises(NatsTimeout):
            await bus.nc.request("bus.silent", b"anyone?", timeout=0.3)
        assert bus.nc._resp_map == {}


async def test_a_stream_publish_returns_its_ack_and_a_refused_one_raises_the_servers_error(settings):
    async with Bus.connect(settings, "test-bus") as bus:
        assert isinstance(bus.js, TunedJetStream)
        await bus.js.add_stream(StreamConfig(name="BUS_TEST", subjects=["bus.stream.>"]))
        first = await bus.js.publish("bus.stream.a", b"1", headers={"Nats-Msg-Id": "m1"})
        again = await bus.js.publish("bus.stream.a", b"1", headers={"Nats-Msg-Id": "m1"})
        assert (first.stream, first.seq, bool(first.duplicate)) == ("BUS_TEST", 1, False)
        assert (again.seq, again.duplicate) == (1, True)
        with pytest.raises(BadRequestError) as refused:  # stored at sequence 1, not 7
            await bus.js.publish("bus.stream.a", b"2", headers={"Nats-Expected-Last-Subject-Sequence": "7"})
        assert refused.value.err_code == 10071
        with pytest.raises(NoStreamResponseError):
            await bus.js.publish("bus.nostream", b"3", timeout=1)
