"""A scripted backend for tests that must force a model's words: registered like any real backend.

    script = scripted("planner")                     # binding "scripted:planner"
    script.enqueue("plain text", tool("run_sql", query="SELECT 1"), RuntimeError("boom"))

Each call pops the next reply; with the queue empty it answers `default` (text, or a callable of the request that
may return an awaitable, to make a test's model wait).
"""

from __future__ import annotations

import inspect
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from app.backends.base import register_backend
from app.bindings import BindingOptions, register_kind
from app.wire import AssistantMessage, ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, DeltaMessage, ToolCall, Usage

_SCRIPTS: dict[str, "Script"] = {}


class Script:
    def __init__(self) -> None:
        self.replies: deque[Any] = deque()
        self.requests: list[ChatRequest] = []
        self.default: Any = "ok"
        self.lock = threading.Lock()

    def enqueue(self, *replies: Any) -> "Script":
        self.replies.extend(replies)
        return self

    def next(self, req: ChatRequest) -> Any:
        with self.lock:
            self.requests.append(req)
            if self.replies:
                return self.replies.popleft()
        return self.default(req) if callable(self.default) else self.default


def tool(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(function={"name": name, "arguments": json.dumps(arguments)})


def tool_then_text(call: ToolCall, text: str) -> Callable[[ChatRequest], Any]:
    """A sub-agent's model: the tool call on its first turn (which must call a tool), then the text."""
    return lambda req: text if any(m.role == "tool" for m in req.messages) else call


def scripted(name: str = "default") -> Script:
    """The script behind binding `scripted:<name>` (created on first use)."""
    return _SCRIPTS.setdefault(name, Script())


def reset() -> None:
    _SCRIPTS.clear()


class ScriptedBackend:
    def __init__(self, binding) -> None:
        self.binding = binding

    async def complete(self, req: ChatRequest) -> ChatResponse:
        reply = scripted(self.binding.target).next(req)
        if inspect.isawaitable(reply):
            reply = await reply
        if isinstance(reply, BaseException):
            raise reply
        return to_response(reply)

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        resp = await self.complete(req)
        msg = resp.message
        yield ChatChunk(id=resp.id, choices=[ChunkChoice(delta=DeltaMessage(role="assistant"))])
        for word in (msg.content or "").split(" "):
            yield ChatChunk(id=resp.id, choices=[ChunkChoice(delta=DeltaMessage(content=word + " "))])
        for i, tc in enumerate(msg.tool_calls or []):
            delta = {"index": i, "id": tc.id, "type": "function", "function": tc.function.model_dump()}
            yield ChatChunk(id=resp.id, choices=[ChunkChoice(delta=DeltaMessage(tool_calls=[delta]))])
        yield ChatChunk(id=resp.id, choices=[ChunkChoice(delta=DeltaMessage(), finish_reason=resp.choices[0].finish_reason)],
                        usage=resp.usage)


def to_response(reply: Any) -> ChatResponse:
    """Text → a text reply; a ToolCall or list of them → a tool-call reply; a ChatResponse as is."""
    if isinstance(reply, ChatResponse):
        return reply
    calls = [reply] if isinstance(reply, ToolCall) else reply if isinstance(reply, list) else None
    if calls:
        msg, finish = AssistantMessage(content=None, tool_calls=calls), "tool_calls"
    else:
        msg, finish = AssistantMessage(content=str(reply)), "stop"
    words = len(str(reply).split())
    return ChatResponse(choices=[Choice(message=msg, finish_reason=finish)],
                        usage=Usage(prompt_tokens=10, completion_tokens=words, total_tokens=10 + words))


def install() -> None:
    register_kind("scripted", BindingOptions)
    register_backend("scripted", ScriptedBackend, pricing="hosted")


install()
