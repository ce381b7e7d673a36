"""agent worker service: one process per agent kind; start more to scale that kind.

Every replica follows the policy (its model providers, MCP servers and tool settings) and
the breaker bucket (tools and models it may not call), and listens on `corral.sim.control` (core NATS, no queue group: every replica hears each
command and answers it) for what the simulated dependencies should do.

Every replica is also a member of its kind's pool for distributed and hybrid tasks (services/workers/board.py):
it follows the boards bucket and claims, runs and answers its kind's subtasks there, each one a step run by the
same `Worker.on_step` as the steps the executor asks for.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket

import anyio
import msgspec
from nats.aio.msg import Msg

from contracts import StepRequested
from contracts import subjects as s
from contracts.boards import Board, ended_board_ttl
from contracts.commands import SimulateDependency
from contracts.queries import SimulationAck
from services.workers import cache
from contracts.approvals import ApprovedCall
from services.workers.batching import Batcher
from services.workers.board import Pool, StepOutcomes
from services.workers.caching import Caching
from services.workers.gates import ApprovedCalls
from services.workers.leases import Leases
from services.workers.conversation import Tool
from services.workers.handlers import Tools, Worker
from services.workers.models import ProviderSet
from services.workers.simulated import SIMULATED_TOOLS, SimulatedFaults, SimulatedProvider, SimulatedTool
from services.workers.tools import Toolbox
from shared.breakers import BreakerGate, BreakerView, lease_requester
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.quarantine import Quarantine
from shared.reservations import reservation_requester
from shared.slots import slots_bucket
from shared.runtime import micro_service
from shared.streams import consumer_config
from shared.watch import follow_bucket

log = logging.getLogger(__name__)
APPROVED_CALLS_TTL_S = 30 * 86_400.0
"""How long the note of an approved call is kept: longer than any step is redelivered."""
_simulate = msgspec.json.Decoder(SimulateDependency).decode


def name(agent: str) -> str:
    return f"worker-{agent}"


class _RealThenSimulated:
    """Tools by name: the real ones (built-in, plug-in, MCP) first, then the simulated stand-ins."""

    def __init__(self, toolbox: Toolbox, faults: SimulatedFaults) -> None:
        self.toolbox = toolbox
        self.simulated = {tool: SimulatedTool(tool, faults=faults) for tool in SIMULATED_TOOLS}

    def get(self, tool: str) -> Tool | None:
        return self.toolbox.get(tool) or self.simulated.get(tool)


async def run(settings: Settings, stop: anyio.Event, agent: str) -> None:
    faults = SimulatedFaults()
    simulated = SimulatedProvider(latency_s=settings.sim_latency_s, failure_rate=settings.sim_failure_rate,
                                  faults=faults)
    async with Bus.connect(settings, name(agent)) as bus:
        worker_id = f"{socket.gethostname()}-{os.getpid()}"
        quarantine = Quarantine(bus.js, name(agent))
        policy_kv = await bus.policy_bucket()
        policy = await PolicyView.load(policy_kv, quarantine)
        view = BreakerView(quarantine)
        toolbox = Toolbox(lambda: policy().workers)
        providers = ProviderSet(policy, simulated, settings.local_model_url)
        tools: Tools = _RealThenSimulated(toolbox, faults)
        responses_kv = await cache.declare(bus.js, settings)
        caching = Caching(cache.Store(responses_kv, quarantine), policy, leases=Leases(responses_kv, worker_id))
        outcomes = StepOutcomes(bus.emit)  # a pool member's steps are published as any, and handed back to it
        notes = TypedBucket(await bus.bucket(s.KV_APPROVED_CALLS, ttl_s=APPROVED_CALLS_TTL_S), ApprovedCall,
                            lambda: None, quarantine=quarantine)
        batcher = Batcher()
        worker = Worker(worker_id, providers, outcomes.emit, tools=tools, policy=policy, notify=bus.notify,
                        gate=BreakerGate(view, lease_requester(bus.nc, worker_id)),
                        trace_content=settings.trace_content, caching=caching,
                        approved_calls=ApprovedCalls(notes, worker_id), batcher=batcher)
        boards_kv = await bus.bucket(s.KV_BOARDS)
        boards = TypedBucket(boards_kv, Board, lambda: None, expires=ended_board_ttl, quarantine=quarantine)
        # the member's id tells two replicas in one process apart (tests and embedded stacks run several)
        pool = Pool(agent, f"{worker_id}-{secrets.token_hex(2)}", boards, outcomes.runner(worker.on_step), bus.emit,
                    policy=policy, notify=bus.notify, reserve=reservation_requester(bus.nc),
                    slots=slots_bucket(await bus.bucket(s.KV_SLOTS), quarantine))
        steps = Consumer(bus, s.STREAM_STEPS,
                         consumer_config(settings, s.consumer_worker(agent), s.step_requested(agent)),
                         decoder_for(StepRequested), worker.on_step, long_running=True)

        async def on_simulate(msg: Msg) -> None:
            try:
                command = _simulate(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("ignoring a bad simulation command: %s", exc)
                return
            faults.apply(command)
            log.info("simulated %s: %s", command.dependency, command.mode)
            if msg.reply:
                await msg.respond(msgspec.json.encode(SimulationAck(
                    worker=worker_id, agent=agent, dependency=command.dependency, mode=command.mode)))

        def stats() -> dict:
            return {"worker": worker_id, "breakers": view.snapshot(), "consumer": steps.stats_dict(),
                    "simulated_faults": {dep: fault.mode for dep, fault in faults.by_dependency.items()},
                    "tools": toolbox.stats(), "policy": policy.stats(), "quarantined": quarantine.stats(),
                    "pool": {"member": pool.member, **pool.snapshot()}, "cache": caching.stats(),
                    "batching": batcher.stats()}

        control = await bus.nc.subscribe(s.SIM_CONTROL, cb=on_simulate)
        try:
            async with micro_service(bus, f"{agent} agent worker", stats=stats), anyio.create_task_group() as tg:
                tg.start_soon(policy.follow, policy_kv, stop)
                tg.start_soon(view.follow, await bus.bucket(s.KV_BREAKERS), stop)
                tg.start_soon(toolbox.maintain, stop)
                tg.start_soon(follow_bucket, boards_kv, pool.apply, stop, ">", quarantine)
                tg.start_soon(pool.run, stop)
                await tg.start(batcher.run, stop)  # before the first step: batching agents batch from it
                # the semantic index of this agent kind's answers only (keys are TENANT.AGENT.DIGEST)
                tg.start_soon(follow_bucket, responses_kv, caching.index.apply, stop, f"*.{agent}.*", quarantine)
                await steps.run(stop)
                tg.cancel_scope.cancel()
        finally:
            await control.unsubscribe()
            await providers.aclose()
            await caching.embedder.aclose()
