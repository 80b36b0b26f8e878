"""Plain records the capture store takes and returns: one call, one run, one template, one agent's stats.

`request_payload` and `response_payload` turn wire types into the JSON a call stores, so every writer (graph,
proxy, eval) stores the same shape and dataset building reads one format.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from app.wire import ChatRequest, ChatResponse

Source = Literal["graph", "proxy", "eval"]
Role = Literal["teacher", "student", "shadow"]  # shadow: a student run beside the teacher, never shown to the client
# "died" is never stored: the store reports a "running" run as died when its process on this host is gone.
RunStatus = Literal["running", "ok", "failed", "interrupted", "died"]
Origin = Literal["base", "evolved", "manual", "langfuse"]
TemplateStatus = Literal["live", "retired"]

# Request fields stored as themselves; everything else OpenAI accepts goes under "params".
_REQUEST_KEYS = ("messages", "tools", "tool_choice", "response_format")
_NOT_PARAMS = {*_REQUEST_KEYS, "model", "metadata", "stream"}


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class CallRecord:
    route: str
    binding: str
    request: dict[str, Any]  # messages, tools, tool_choice, response_format, params
    response: dict[str, Any] | None  # content, tool_calls, finish_reason; None when the backend failed
    valid: bool = True
    id: str = field(default_factory=new_id)
    run_id: str | None = None
    agent: str | None = None
    template_id: str | None = None
    source: Source = "graph"
    error_type: str | None = None
    error_detail: str | None = None
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    teacher_cost_usd: float | None = None
    created_at: datetime = field(default_factory=utcnow)
    role: Role = "teacher"
    parent_id: str | None = None  # the attempt this one replaced (a fallback) or shadowed
    fallback_reason: str | None = None  # why the parent's answer was not used: error, timeout, invalid, confidence
    agreement: bool | None = None  # a shadow student's answer matched the teacher's (None: not judged)
    caller: str | None = None  # the hash of the proxy key that made the call


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    query: str
    status: RunStatus
    started_at: datetime
    answer: str | None = None
    error: str | None = None
    finished_at: datetime | None = None
    pid: int | None = None  # of the process running it, on `host` (None for runs recorded before m004)
    host: str | None = None


@dataclass(frozen=True, slots=True)
class TemplateRecord:
    """A versioned system prompt of one route; `content_hash` keeps an identical text from being stored twice."""

    id: str  # stable, e.g. "retrieval/base@1" or "retrieval/evolved-3f2a9c01de"
    route: str
    text: str
    origin: Origin = "base"
    parent_id: str | None = None
    content_hash: str = ""  # filled from the text when empty (`template_hash`)
    status: TemplateStatus = "live"
    retired_reason: str | None = None
    successes: int = 0
    failures: int = 0
    created_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        if not self.content_hash:
            object.__setattr__(self, "content_hash", template_hash(self.text))

    @property
    def agent(self) -> str:  # the graph's agents are routes; older readers say agent
        return self.route

    @property
    def trials(self) -> int:
        return self.successes + self.failures

    @property
    def live(self) -> bool:
        return self.status == "live"


_SPACE = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    """A system prompt as its fingerprint sees it: runs of white space are one space, none at either end."""
    return _SPACE.sub(" ", text).strip()


def template_hash(text: str) -> str:
    """The content hash of a template, which is also a proxy client's system-prompt fingerprint (sha256 hex)."""
    return hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class RouteStateRecord:
    """A route's live rollout state, shared by every process through the store."""

    route: str
    stage: str
    student: str | None
    auto: bool
    since: datetime  # when the current stage began: outcomes before it do not count for its gates
    version: int = 0


@dataclass(frozen=True, slots=True)
class StageChange:
    route: str
    old_stage: str | None
    new_stage: str
    reason: str
    evidence: dict[str, Any] | None = None
    id: str = field(default_factory=new_id)
    created_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True, slots=True)
class Outcomes:
    """A route's judged student calls in its current stage (what the gates read)."""

    successes: int
    trials: int


@dataclass(frozen=True, slots=True)
class AgentStats:
    agent: str | None
    calls: int
    valid_rate: float
    p50_latency_ms: float


def template_outcome(call: Any) -> bool | None:
    """What a captured call says about the template it ran under: True (a success), False (a failure) or None.

    Graph and proxy calls with a template id count; eval calls do not (they measure, they do not select). A call
    that got no answer (backend error, timeout, aborted) says nothing about its prompt. Otherwise it succeeds when
    its output was valid and a shadow comparison did not find it disagreeing with the teacher; negative feedback
    later turns a success into a failure (`CaptureStore.add_feedback`). Takes a CallRecord or a call row (a dict).
    """
    get = call.get if isinstance(call, dict) else lambda key: getattr(call, key)
    if not get("template_id") or get("source") == "eval" or get("response") is None or get("error_type") == "aborted":
        return None
    return bool(get("valid")) and get("agreement") is not False


def request_payload(req: ChatRequest) -> dict[str, Any]:
    """What a call stores of its request: the messages, tools and format, and the sampling params apart."""
    data = req.model_dump(exclude_none=True)
    payload = {key: data.get(key) for key in _REQUEST_KEYS}
    payload["params"] = {k: v for k, v in data.items() if k not in _NOT_PARAMS}
    return payload


def response_payload(resp: ChatResponse) -> dict[str, Any]:
    """What a call stores of its response: the first choice's content, tool calls and finish reason."""
    choice = resp.choices[0]
    calls = choice.message.tool_calls
    payload = {
        "content": choice.message.content,
        "tool_calls": [c.model_dump(exclude_none=True) for c in calls] if calls else None,
        "finish_reason": choice.finish_reason,
    }
    if not resp.usage.known:
        payload["usage"] = "unknown"  # the upstream sent no token counts: the call's zeros are not counts
    return payload


def call_summary(call: CallRecord) -> dict[str, Any]:
    """One captured call as the CLI shows it (`slmswap run`, `slmswap calls list`)."""
    return {"id": call.id, "agent": call.agent or call.route, "binding": call.binding,
            "template_id": call.template_id, "latency_ms": round(call.latency_ms, 1),
            "tokens": call.prompt_tokens + call.completion_tokens, "valid": call.valid,
            "error_type": call.error_type, "cost_usd": call.cost_usd}
