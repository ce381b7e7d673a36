"""The bus's connection writes commands in batches; nothing may be lost or reordered by that."""

from __future__ import annotations

import anyio
import pytest

from shared.bus import Bus, CoalescingClient

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_commands_from_many_tasks_all_arrive_and_each_tasks_stay_in_order(settings):
    async with Bus.connect(settings, "test-bus") as bus:
        assert isinstance(bus.nc, CoalescingClient)
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
