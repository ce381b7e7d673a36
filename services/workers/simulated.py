"""The SIMULATED model provider and tools: deterministic text, real token counts, injected latency and failures.

It calls no model and no tool. It exists for the default demo, the tests and the
benchmarks, and it is named `simulated` wherever it appears (dependency keys, model
names, outputs). Its output is a function of the prompt alone, so runs are repeatable.

In the agent loop it behaves like a model that uses every tool it is offered: its first
answer calls each tool once (arguments from the prompt), and once the conversation holds
the tools' results it answers in text.

Directives in a prompt steer it (tests and demos use them; real providers ignore them):
    [sim:fail=transient|permanent|timeout|rate_limited]   every attempt fails with that class
    [sim:flaky=N]                                          the first N attempts fail (transient, or [sim:error=…])
    [sim:error=CLASS]                                      the class the flaky attempts fail with
    [sim:retry_after=S]                                    the retry-after a rate_limited failure carries (0.2)
    [sim:latency=S]                                        this call takes S seconds
    [sim:bad_plan=N]                                       asked for a plan, the first N attempts answer nonsense

Asked for a plan (shared.plans.PLAN_REQUEST), it answers a valid one: a part for each of the first
three agents it is offered, independent of each other.

At run time, every worker replica also obeys `corral sim fail|slow|recover DEPENDENCY`
(SimulateDependency on `corral.sim.control`), kept in `SimulatedFaults`: a dependency
(`simulated/MODEL` or `tool/NAME`) can be made to fail every call, or to take longer,
until it is told to recover. A call waiting out the added latency returns as soon as
its dependency is told anything new (recover, or another fault), and then ends as the
fault it began under says: so a test or a demo can hold calls in flight for as long
as it needs, and let them go when it is ready, whatever the machine's speed.
"""

from __future__ import annotations

import hashlib
import re

import anyio
import msgspec

from contracts import Usage
from contracts.commands import SimulateDependency
from contracts.state import dependency_key, tool_key
from services.workers.conversation import Completion, ModelRequest, OnText, ToolCall, ToolSpec, Turn
from services.workers.errors import (
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    TransientProviderError,
)
from shared import plans
from shared.tokens import count_chat, encoding

NAME = "simulated"
_DIRECTIVE = re.compile(r"\[sim:(fail|flaky|error|retry_after|latency|bad_plan)=([A-Za-z0-9_.]+)\]")
_ERRORS: dict[str, type[ProviderError]] = {
    "transient": TransientProviderError,
    "permanent": PermanentProviderError,
    "timeout": ProviderTimeout,
    "rate_limited": ProviderRateLimited,
}
_WORDS = ("agent", "plan", "result", "source", "evidence", "draft", "code", "test", "summary", "risk", "budget",
          "latency", "trace", "step", "answer", "review", "data", "model", "tool", "context", "finding")


class SimulatedFaults:
    """What operators told the simulated dependencies to do, per dependency key (one per worker process)."""

    def __init__(self) -> None:
        self.by_dependency: dict[str, SimulateDependency] = {}
        self._replaced: dict[str, anyio.Event] = {}
        """dependency -> set when its current fault is replaced (calls waiting out its latency return)."""

    def apply(self, command: SimulateDependency) -> None:
        if (replaced := self._replaced.pop(command.dependency, None)) is not None:
            replaced.set()
        if command.mode == "recover":
            self.by_dependency.pop(command.dependency, None)
        else:
            self.by_dependency[command.dependency] = command
            self._replaced[command.dependency] = anyio.Event()

    async def call(self, dependency: str) -> None:
        """Add the latency of a `slow` dependency (cut short when it is told anything new); raise the error
        of a `fail` one."""
        fault = self.by_dependency.get(dependency)
        if fault is None:
            return
        if fault.latency_s > 0:
            with anyio.move_on_after(fault.latency_s):
                await self._replaced[dependency].wait()
        if fault.mode == "fail":
            error = _ERRORS[fault.error]
            retry_after = fault.retry_after_s if fault.retry_after_s is not None else 0.2
            raise error(f"simulated {fault.error} failure of {dependency} (corral sim fail)",
                        retry_after_s=retry_after if error is ProviderRateLimited else None)


class SimulatedProvider:
    """A stand-in for a model API. Configure its base latency and failure rate."""

    name = NAME
    system = NAME

    def __init__(self, latency_s: float = 0.05, failure_rate: float = 0.0,
                 faults: SimulatedFaults | None = None) -> None:
        self.latency_s = latency_s
        self.failure_rate = failure_rate
        self.faults = faults or SimulatedFaults()

    async def complete(self, request: ModelRequest, on_text: OnText | None = None) -> Completion:
        prompt = "\n".join(turn.content for turn in request.messages)
        directives = dict(_DIRECTIVE.findall(prompt))
        latency = float(directives.get("latency", self.latency_s))
        if latency > 0:
            await anyio.sleep(latency)
        await self.faults.call(dependency_key(NAME, request.model))
        self._maybe_fail(directives, request.call_id, request.attempt)
        # Billed like a chat API: the conversation with its per-message overhead, then the reply.
        input_tokens = count_chat(request.messages, request.model)
        if request.tools and not any(turn.role == "tool" for turn in request.messages):
            calls = [_call_for(tool, n, _last_user_text(request.messages)) for n, tool in enumerate(request.tools)]
            return Completion(text="", tool_calls=calls, finish_reason="tool_calls", response_model=request.model,
                              usage=Usage(input_tokens=input_tokens, output_tokens=8 * len(calls)))
        if plans.PLAN_REQUEST in prompt:
            text = _plan(prompt) if request.attempt > int(directives.get("bad_plan", "0")) else "no plan today"
            output_tokens = len(encoding().encode_ordinary(text))
        else:
            text, output_tokens = _generate(request.model, prompt, request.max_tokens)
        return Completion(text=text, finish_reason="stop", response_model=request.model,
                          usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens))

    def _maybe_fail(self, directives: dict[str, str], call_id: str, attempt: int) -> None:
        retry_after = float(directives.get("retry_after", "0.2"))
        if "fail" in directives:
            error = _ERRORS.get(directives["fail"], TransientProviderError)
            raise error(f"simulated {error.error_class} failure (requested by the prompt)",
                        retry_after_s=retry_after if error is ProviderRateLimited else None)
        if attempt <= int(directives.get("flaky", "0")):
            error = _ERRORS.get(directives.get("error", "transient"), TransientProviderError)
            raise error(f"simulated {error.error_class} failure on attempt {attempt}",
                        retry_after_s=retry_after if error is ProviderRateLimited else None)
        if _fraction(call_id) < self.failure_rate:
            raise TransientProviderError("simulated transient failure (sim_failure_rate)")


SIMULATED_TOOLS = ("search", "code_interpreter", "browser")
"""Tools with no real implementation here: the simulated ones answer for them."""


class SimulatedTool:
    """A stand-in for a tool (search, browser, …): a dependency `tool/NAME` with its own breaker. A call
    returns a short deterministic text; faults apply as to models."""

    def __init__(self, name: str, latency_s: float = 0.0, faults: SimulatedFaults | None = None) -> None:
        self.spec = ToolSpec(name=name, description=f"SIMULATED {name}: returns a placeholder result",
                             parameters={"type": "object", "properties": {"query": {"type": "string"}},
                                         "required": ["query"]})
        self.dependency = tool_key(name)
        self.latency_s = latency_s
        self.faults = faults or SimulatedFaults()

    async def run(self, arguments: dict) -> str:
        await anyio.sleep(self.latency_s)
        await self.faults.call(self.dependency)
        digest = hashlib.sha256(f"{self.spec.name}\0{arguments.get('query', '')}".encode()).hexdigest()[:12]
        return f"[simulated {self.spec.name} result {digest}]"


def _call_for(tool: ToolSpec, n: int, text: str) -> ToolCall:
    """A call of `tool` whose required string arguments all get `text`."""
    properties = tool.parameters.get("properties", {})
    arguments = {name: text for name in tool.parameters.get("required", [])
                 if properties.get(name, {}).get("type") == "string"}
    return ToolCall(id=f"sim-call-{n}", name=tool.name, arguments=msgspec.json.encode(arguments).decode())


def _last_user_text(messages: list[Turn]) -> str:
    return next((turn.content for turn in reversed(messages) if turn.role == "user"), "")


def _plan(prompt: str) -> str:
    """A SIMULATED manager's plan: one independent part for each of the first three agents the prompt lists."""
    line = next((line for line in prompt.splitlines() if line.startswith(plans.AGENTS_LINE)), plans.AGENTS_LINE)
    agents = [a.strip() for a in line.removeprefix(plans.AGENTS_LINE).split(",") if a.strip()][:3]
    request = next((line for line in prompt.splitlines() if line.startswith("Request: ")), "Request: the task")
    subtasks = [{"id": f"part{n + 1}", "agent": agent, "instruction": f"Your part, as {agent}, of: "
                 f"{request.removeprefix('Request: ')}"} for n, agent in enumerate(agents)]
    return "Here is the plan:\n" + msgspec.json.encode({"subtasks": subtasks}).decode()


def _fraction(key: str) -> float:
    """A stable number in [0, 1) for `key`."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _generate(model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """The reply and the tokens it took, as a model counts them: those it generated."""
    digest = hashlib.sha256(f"{model}\0{prompt}".encode()).digest()
    words = max(8, min(max_tokens // 2, 24 + digest[0] % 96))
    body = " ".join(_WORDS[digest[i % len(digest)] % len(_WORDS)] for i in range(words))
    tokens = encoding().encode_ordinary(f"[simulated {model}] {body}.")[:max_tokens]  # a real model stops there too
    return encoding().decode(tokens), len(tokens)
