"""Every subject, stream, consumer, KV bucket and header name, in one place.

Services never type a subject inline: they call a builder here. Tenants, users,
agent kinds and dependencies are subject tokens (see `events.Token`).
"""

from __future__ import annotations

import re

from contracts.events import TOKEN_PATTERN

PREFIX = "corral"

# --- subjects -----------------------------------------------------------------


def task_submitted(tenant: str) -> str:
    return f"{PREFIX}.task.submitted.{tenant}"


_SUBMITTED_PREFIX = f"{PREFIX}.task.submitted."
_TOKEN = re.compile(TOKEN_PATTERN)


def submission_tenant(subject: str) -> str | None:
    """The tenant a submission was published for: its subject's tenant token, or None if that is not a
    valid tenant id. The subject, not the body, says who sent it (a publisher may write only its own)."""
    tenant = subject.removeprefix(_SUBMITTED_PREFIX)
    return tenant if tenant != subject and _TOKEN.fullmatch(tenant) else None


def task_validated(tenant: str) -> str:
    return f"{PREFIX}.task.validated.{tenant}"


def task_admitted(tenant: str) -> str:
    return f"{PREFIX}.task.admitted.{tenant}"


def task_rejected(tenant: str) -> str:
    return f"{PREFIX}.task.rejected.{tenant}"


def task_progress(tenant: str, task_id: str) -> str:
    return f"{PREFIX}.task.progress.{tenant}.{_token(task_id)}"


def task_completed(tenant: str) -> str:
    return f"{PREFIX}.task.completed.{tenant}"


def task_failed(tenant: str) -> str:
    return f"{PREFIX}.task.failed.{tenant}"


def step_requested(agent: str) -> str:
    return f"{PREFIX}.step.requested.{agent}"


def step_completed(tenant: str) -> str:
    return f"{PREFIX}.step.completed.{tenant}"


def step_failed(tenant: str) -> str:
    return f"{PREFIX}.step.failed.{tenant}"


def breaker_state(dependency: str) -> str:
    return f"{PREFIX}.breaker.state.{_token(dependency)}"


def alert(severity: str, rule: str) -> str:
    """Alert and AlertResolved of one rule: `corral.alert.<severity>.<name>`."""
    return f"{PREFIX}.alert.{_token(severity)}.{_token(rule)}"


def cost_notice(tenant: str, user: str) -> str:
    return f"{PREFIX}.cost.notice.{tenant}.{user}"


def service_stats(service: str) -> str:
    """One replica's stats (every replica answers `$SRV.STATS.corral-<service>`); kept out of
    every stream's subjects, where a request would be answered by the stream's publish ack."""
    return f"{PREFIX}.stats.{service}"


def dead_letter(service: str) -> str:
    return f"{PREFIX}.dlq.{service}"


def tenant_progress(tenant: str) -> str:
    """Every progress subject of one tenant's tasks."""
    return f"{PREFIX}.task.progress.{tenant}.>"


def tenant_cost_notices(tenant: str) -> str:
    """Every cost notice of one tenant's users."""
    return f"{PREFIX}.cost.notice.{tenant}.>"


def tenant_inbox(tenant: str) -> str:
    """The inbox prefix of a tenant's connections (nats-py `inbox_prefix`): replies to its requests, such as
    the acknowledgement of a submission, come under it, where no other tenant may listen."""
    return f"{INBOX}_{tenant}"


def kv_writes(bucket: str) -> str:
    """Every key of a bucket, as written: a put, delete or purge is a publish to `$KV.<bucket>.<key>`."""
    return f"{KV_PREFIX}.{bucket}.>"


def _token(value: str) -> str:
    """Make a value safe as one subject token ('.' separates tokens)."""
    return value.replace(".", "_").replace("*", "_").replace(">", "_").replace(" ", "_")


# Wildcards that consumers filter on.
ALL_SUBMITTED = f"{PREFIX}.task.submitted.*"
"""Ingress: exactly one tenant token. `corral.task.submitted` alone, or with more tokens, is stored by no
stream, so a publisher's JetStream publish there fails (no responders) instead of waiting unanswered."""
ALL_VALIDATED = f"{PREFIX}.task.validated.>"
ALL_ADMITTED = f"{PREFIX}.task.admitted.>"
ALL_REJECTED = f"{PREFIX}.task.rejected.>"
ALL_PROGRESS = f"{PREFIX}.task.progress.>"
ALL_COMPLETED = f"{PREFIX}.task.completed.>"
ALL_FAILED = f"{PREFIX}.task.failed.>"
INTERNAL_TASK_EVENTS = (ALL_VALIDATED, ALL_ADMITTED, ALL_REJECTED, ALL_PROGRESS, ALL_COMPLETED, ALL_FAILED)
"""What services publish about a task (CORRAL_TASKS); submissions are apart, in CORRAL_INGRESS."""
ALL_TASK_EVENTS = f"{PREFIX}.task.>"
"""Every task subject, submissions included: for listening (core NATS), never a stream's subjects."""
ALL_STEP_COMPLETED = f"{PREFIX}.step.completed.>"
ALL_STEP_FAILED = f"{PREFIX}.step.failed.>"
ALL_STEP_EVENTS = f"{PREFIX}.step.>"
ALL_BREAKER = f"{PREFIX}.breaker.>"
ALL_COST = f"{PREFIX}.cost.>"
ALL_ALERTS = f"{PREFIX}.alert.>"
POLICY_ROLLED_BACK = f"{PREFIX}.policy.rolled_back"
ALL_DEAD_LETTERS = f"{PREFIX}.dlq.>"
ALL_PROGRESS = f"{PREFIX}.task.progress.>"
ALL_STEP_REQUESTED = f"{PREFIX}.step.requested.>"
ALL_STATS = f"{PREFIX}.stats.>"

# NATS's own subjects, named in the permissions of identities (services/auth.py).
INBOX = "_INBOX"  # replies to a connection's requests: `_INBOX.<token>...`
ALL_INBOXES = f"{INBOX}.>"
JS_API = "$JS.API.>"  # JetStream's API: streams, consumers, fetches, bucket reads (direct gets)
JS_ACKS = "$JS.ACK.>"  # acknowledgements of messages a consumer delivered
JS_FLOW_CONTROL = "$JS.FC.>"  # flow-control replies of ordered consumers (bucket watches)
KV_PREFIX = "$KV"
ALL_KV = f"{KV_PREFIX}.>"
SERVICES_API = "$SRV.>"  # NATS micro services: PING, INFO, STATS

# Request/reply endpoints of the NATS micro services.
MONITOR_STATUS = f"{PREFIX}.monitor.status"
MONITOR_ALERTS = f"{PREFIX}.monitor.alerts"  # AlertsQuery -> AlertsReply (`corral alerts`)
MONITOR_SILENCE = f"{PREFIX}.monitor.silence"  # SilenceAlert -> AlertsReply
EXECUTOR_TASK = f"{PREFIX}.executor.task"
BUDGET_SHOW = f"{PREFIX}.budget.show"
BUDGET_COST = f"{PREFIX}.budget.cost"
BUDGET_EXTEND = f"{PREFIX}.budget.extend"  # ExtendReservation -> ReservationReply
# The breaker's endpoints live under `corral.breakers.`, outside `corral.breaker.>`: a request on a
# subject a stream stores would be answered by the stream's publish acknowledgement.
BREAKER_PROBE = f"{PREFIX}.breakers.probe"  # AcquireProbe -> ProbeGrant
BREAKER_CONTROL = f"{PREFIX}.breakers.control"  # ControlBreaker -> BreakerReply
# Core NATS (no stream): every SIMULATED worker replica subscribes and answers.
SIM_CONTROL = f"{PREFIX}.sim.control"  # SimulateDependency -> SimulationAck from each replica

# --- streams (file storage; see shared/streams.py for their configuration) ---

STREAM_INGRESS = "CORRAL_INGRESS"  # what publishers submit, apart from every internal event (untrusted)
STREAM_TASKS = "CORRAL_TASKS"
STREAM_STEPS = "CORRAL_STEPS"
STREAM_SIGNALS = "CORRAL_SIGNALS"
STREAM_DLQ = "CORRAL_DLQ"

# --- durable consumers ---------------------------------------------------------

CONSUMER_GUARD = "guard"
CONSUMER_BUDGET_ADMIT = "budget-admit"
CONSUMER_BUDGET_USAGE = "budget-usage"
CONSUMER_BUDGET_RELEASE = "budget-release"
CONSUMER_EXECUTOR_TASKS = "executor-tasks"
CONSUMER_EXECUTOR_STEPS = "executor-steps"
CONSUMER_BREAKER = "breaker"


def consumer_worker(agent: str) -> str:
    return f"worker-{agent}"


# --- KV buckets, each owned by one service -------------------------------------

KV_BUDGET = "corral_budget"  # budget
KV_TASKS = "corral_tasks"  # executor
KV_BREAKERS = "corral_breakers"  # breaker
KV_POLICY = "corral_policy"  # operators (corral policy apply); every service reads it
KV_RATES = "corral_rates"  # guard
KV_CACHE = "corral_cache"  # executor: answers kept for `cache` strategies
KV_SUBMISSIONS = "corral_submissions"  # guard: which submission holds each (tenant, task id)
KV_BOARDS = "corral_boards"  # executor writes each distributed or hybrid task's plan; agent pools claim and answer
KV_SLOTS = "corral_slots"  # executor and agent pools: each tenant's running subtasks (max_parallel_per_tenant)
KV_RESPONSES = "corral_responses"  # agent workers: the response cache (services/workers/cache.py)
KV_MONITOR = "corral_monitor"  # monitor: snapshots of its figures, the stream positions they cover, alert state

# --- headers -------------------------------------------------------------------

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_TASK_ID = "Corral-Task-Id"


# --- scaling advice (core NATS, no stream: only the latest advice matters) ---------

SCALE_ADVICE_PREFIX = f"{PREFIX}.scale.advice"
ALL_SCALE_ADVICE = f"{SCALE_ADVICE_PREFIX}.>"


def scale_advice(service: str) -> str:
    """Where the monitor publishes ScaleAdvice for `service` (e.g. `worker-research`)."""
    return f"{SCALE_ADVICE_PREFIX}.{service}"
# --- human approvals (services/approvals owns the records; the executor asks and resumes) ---------------------


def approval_requested(tenant: str) -> str:
    return f"{PREFIX}.approval.requested.{tenant}"


def approval_decided(tenant: str) -> str:
    """Approved, denied, edited, timed out or escalated: every decision on one tenant's approvals."""
    return f"{PREFIX}.approval.decided.{tenant}"


def approval_reminder(tenant: str) -> str:
    return f"{PREFIX}.approval.reminder.{tenant}"


def approvals_decide(reviewer: str) -> str:
    """Where reviewer `reviewer` sends its decisions: the subject names the reviewer, and nats-server lets each
    reviewer's identity publish only on its own, so the service knows who decided from the subject alone."""
    return f"{PREFIX}.approvals.decide.{reviewer}"


def reviewer_inbox(reviewer: str) -> str:
    """The inbox prefix of a reviewer's connections: its replies, where no other reviewer listens. Inside
    `_INBOX.>`, so the approvals service may answer there (services reply on `_INBOX.>`), unlike a tenant's."""
    return f"{INBOX}.reviewer_{reviewer}"


def decide_reviewer(subject: str) -> str | None:
    """The reviewer a decision was sent by (its subject's last token), or None if that is no valid id."""
    reviewer = subject.removeprefix(f"{PREFIX}.approvals.decide.")
    return reviewer if reviewer != subject and _TOKEN.fullmatch(reviewer) else None


ALL_APPROVAL_EVENTS = f"{PREFIX}.approval.>"
ALL_APPROVAL_REQUESTED = f"{PREFIX}.approval.requested.>"
ALL_APPROVAL_DECIDED = f"{PREFIX}.approval.decided.>"
# Endpoints live under `corral.approvals.`, outside the stream's `corral.approval.>` (see BREAKER_PROBE).
APPROVALS_LIST = f"{PREFIX}.approvals.list"  # ListApprovals -> ApprovalList
APPROVALS_SHOW = f"{PREFIX}.approvals.show"  # ShowApproval -> ApprovalReply
APPROVALS_HISTORY = f"{PREFIX}.approvals.history"  # ApprovalHistory -> ApprovalEvents
APPROVALS_DECIDE_ANY = f"{PREFIX}.approvals.decide.*"  # DecideApproval -> ApprovalReply
STREAM_APPROVALS = "CORRAL_APPROVALS"
KV_APPROVALS = "corral_approvals"  # approvals
KV_APPROVED_CALLS = "corral_approved_calls"  # workers: each approved call, noted before it is made
CONSUMER_APPROVALS = "approvals"
CONSUMER_EXECUTOR_APPROVALS = "executor-approvals"
CONSUMER_BUDGET_APPROVALS = "budget-approvals"
