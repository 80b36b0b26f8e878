"""OpenAI chat-completions wire types: what the Router takes and returns, and what the proxy speaks.

Field names and order follow OpenAI's API reference, so a request from any OpenAI client validates as is.
Unknown fields are kept (extra="allow") and ignored; slm-swap's own extensions are the few fields marked
"slm-swap" below.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ---- request -------------------------------------------------------------------------------------------

class FunctionCall(OpenAIModel):
    name: str
    arguments: str = "{}"  # a JSON string, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: str = Field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])
    type: Literal["function"] = "function"
    function: FunctionCall

    def parsed_arguments(self) -> Any:
        """The arguments as Python data; raises json.JSONDecodeError when they do not parse."""
        return json.loads(self.function.arguments or "{}")


class Message(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as plain text (content parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if isinstance(p, dict))


class FunctionDef(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatRequest(OpenAIModel):
    messages: list[Message]
    model: str = "default"  # the ROUTE name (an agent's name, or what a proxy client sends)
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    metadata: dict[str, str] | None = None  # the client's own; who is calling travels in a CallContext instead
    n: int | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[Tool] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # needs logprobs: true, as OpenAI's does
    top_p: float | None = None
    user: str | None = None
    # slm-swap: "free" turns grammar constraints off for local models (to measure raw behaviour).
    decoding: Literal["constrained", "free"] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true; set both, or drop top_logprobs")
        return self

    def meta(self, key: str) -> str | None:
        return (self.metadata or {}).get(key)

    def token_limit(self, default: int = 512) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as plain OpenAI dicts (what validators and grammars take)."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]


# ---- response ------------------------------------------------------------------------------------------

class Usage(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # slm-swap: "unknown" when the upstream reported no usable counts (the zeros above are then not counts).
    source: Literal["unknown"] | None = None

    @property
    def known(self) -> bool:
        return self.source != "unknown"


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)  # best first, `top_logprobs` of them


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class Choice(OpenAIModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None  # only when the request asked (`logprobs: true`)
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None = "stop"
    # slm-swap: the mean log-probability of the generated tokens (<= 0; None when the backend cannot tell).
    # Local models always set it; the Router compares it with a route's `min_confidence`.
    confidence: float | None = None


class CallInfo(OpenAIModel):
    """slm-swap: what the Router adds to every response (the proxy returns it as `slmswap`)."""

    call_id: str
    route: str
    binding: str
    role: Literal["teacher", "student", "shadow"] = "teacher"
    template_id: str | None = None
    valid: bool = True
    error_type: str | None = None
    error_detail: str | None = None
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0  # what the route's teacher would have cost for this request (an estimate)


class ChatResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[Choice]
    usage: Usage = Field(default_factory=Usage)
    slmswap: CallInfo | None = None

    @property
    def message(self) -> AssistantMessage:
        return self.choices[0].message


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(OpenAIModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None  # the logprobs of this chunk's tokens, when the request asked
    finish_reason: str | None = None


class ChatChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[ChunkChoice]
    usage: Usage | None = None
    slmswap: CallInfo | None = None


class ErrorBody(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorBody
