"""The Router: every model call in the system goes through here, from a graph node or from the proxy.

It picks the binding for the request's route, calls that backend, validates the output against the request's
tools / response_format, prices the call, and captures it (durably, before returning).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from app.backends.base import BACKENDS, BackendCache
from app.bindings import Binding
from app.capture.records import CallRecord, request_payload, response_payload
from app.config import Settings
from app.cost import cost_usd
from app.errors import BackendError, BadReply, SlmSwapError
from app.routing.context import CallContext
from app.routing.routes import Route, build_route, pick_binding
from app.validation import Verdict, validate_output
from app.wire import (
    AssistantMessage,
    CallInfo,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ToolCall,
    Usage,
)


class Router:
    def __init__(self, settings: Settings, store: Any | None = None, backends: BackendCache = BACKENDS):
        self.settings = settings
        self.store = store  # a CaptureStore, or None to capture nothing
        self.backends = backends
        self._routes: dict[str, Route] = {}

    def route(self, name: str) -> Route:
        if name not in self._routes:
            self._routes[name] = build_route(self.settings, name)
        return self._routes[name]

    async def complete(self, req: ChatRequest, ctx: CallContext | None = None) -> ChatResponse:
        """Answer one chat request on its route's binding; the response carries `slmswap` call info.

        Every attempt is captured, failed and aborted ones included; whatever a backend throws reaches the caller
        as an SlmSwapError (cancellation is captured as `aborted` and re-raised as it is).
        """
        ctx = ctx or CallContext(route=req.model)
        route = self.route(ctx.route)
        binding = pick_binding(route)
        started = time.perf_counter()
        try:
            resp = checked_reply(binding, await self.backends.get(binding).complete(req))
        except BaseException as exc:
            raise self._failed(req, ctx, route, binding, started, exc) from None
        latency_ms = (time.perf_counter() - started) * 1000
        info = await self._finish(req, ctx, route, binding, resp, latency_ms)
        resp.model, resp.slmswap = binding.name, info
        return resp

    async def stream(self, req: ChatRequest, ctx: CallContext | None = None) -> AsyncIterator[ChatChunk]:
        """Stream one chat request; the last chunk carries usage and the `slmswap` call info."""
        ctx = ctx or CallContext(route=req.model)
        route = self.route(ctx.route)
        binding = pick_binding(route)
        started = time.perf_counter()
        acc = _StreamAccumulator()
        try:
            async for chunk in self.backends.get(binding).stream(req):
                acc.add(chunk)
                chunk.model = binding.name
                yield chunk
        except BaseException as exc:
            raise self._failed(req, ctx, route, binding, started, exc, acc.response()) from None
        latency_ms = (time.perf_counter() - started) * 1000
        info = await self._finish(req, ctx, route, binding, acc.response(), latency_ms)
        yield ChatChunk(id=acc.id or "chatcmpl-" + uuid.uuid4().hex, model=binding.name,
                        choices=[ChunkChoice(delta=DeltaMessage(), finish_reason=None)], usage=acc.usage, slmswap=info)

    async def _finish(self, req: ChatRequest, ctx: CallContext, route: Route, binding: Binding, resp: ChatResponse,
                      latency_ms: float) -> CallInfo:
        message, finish_reason, usage = resp.message, resp.choices[0].finish_reason, resp.usage
        tool_calls = [tc.model_dump() for tc in message.tool_calls or []]
        verdict = validate_output(
            content=message.content, tool_calls=tool_calls or None, tools=req.tool_dicts() or None,
            tool_choice=req.tool_choice, response_format=req.response_format,
            parallel_tool_calls=req.parallel_tool_calls,
        )
        if finish_reason == "length" and verdict.valid and (req.response_format or message.tool_calls):
            # Structured output cut short may still parse (a closed prefix); it is not what was asked for.
            verdict = Verdict(False, "invalid_json", "output cut at max_tokens", (), None)
        info = CallInfo(
            call_id=uuid.uuid4().hex, route=route.name, binding=binding.name, template_id=ctx.template_id,
            valid=verdict.valid, error_type=verdict.error_type, error_detail=verdict.detail, latency_ms=latency_ms,
            cost_usd=cost_usd(binding, usage.prompt_tokens, usage.completion_tokens),
        )
        teacher_cost = cost_usd(route.teacher, usage.prompt_tokens, usage.completion_tokens)
        await self._capture(req, ctx, info, response_payload(resp), usage, teacher_cost)
        return info

    def _failed(self, req: ChatRequest, ctx: CallContext, route: Route, binding: Binding, started: float, exc: BaseException,
                partial: ChatResponse | None = None) -> BaseException:
        """Capture a failed or aborted attempt; returns what the caller must raise (our error, or the cancellation)."""
        aborted = not isinstance(exc, Exception)  # CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit
        error = exc if aborted or isinstance(exc, SlmSwapError) else BackendError(
            f"{binding.name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        kind = "aborted" if aborted else getattr(error, "capture_type", "backend_error")
        detail = "the caller went away before the answer was complete" if aborted else str(error)
        info = CallInfo(call_id=uuid.uuid4().hex, route=route.name, binding=binding.name,
                        template_id=ctx.template_id, valid=False, error_type=kind,
                        error_detail=detail[:2000], latency_ms=(time.perf_counter() - started) * 1000)
        # Synchronous on purpose: an aborted call may have no event loop turn left to await a write in
        # (a cancelled task, an async generator being closed). The commit takes milliseconds.
        self._capture_now(req, ctx, info, response_payload(partial) if partial and aborted else None)
        return error

    def _record(self, req: ChatRequest, ctx: CallContext, info: CallInfo, response: dict | None, usage: Usage,
                teacher_cost: float) -> CallRecord:
        return CallRecord(
            id=info.call_id, run_id=ctx.run_id, route=info.route, agent=ctx.agent_name,
            binding=info.binding, template_id=info.template_id, source=ctx.source,
            request=request_payload(req), response=response, valid=info.valid, error_type=info.error_type,
            error_detail=info.error_detail, latency_ms=info.latency_ms, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, cost_usd=info.cost_usd, teacher_cost_usd=teacher_cost,
            created_at=datetime.now(timezone.utc),
        )

    async def _capture(self, req: ChatRequest, ctx: CallContext, info: CallInfo, response: dict | None,
                       usage: Usage, teacher_cost: float) -> None:
        if self.store is not None and ctx.capture:
            await self.store.arecord(self._record(req, ctx, info, response, usage, teacher_cost))

    def _capture_now(self, req: ChatRequest, ctx: CallContext, info: CallInfo, response: dict | None) -> None:
        if self.store is not None and ctx.capture:
            self.store.record(self._record(req, ctx, info, response, Usage(), 0.0))


def checked_reply(binding: Binding, resp: Any) -> ChatResponse:
    """The backend's reply, or BadReply when it is not a response with at least one choice."""
    if not isinstance(resp, ChatResponse) or not resp.choices:
        what = "no choices" if isinstance(resp, ChatResponse) else type(resp).__name__
        raise BadReply(f"{binding.name} answered with {what}, not a chat completion")
    return resp


class _StreamAccumulator:
    """Rebuilds the whole assistant message from stream chunks, to validate and capture it."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.text: list[str] = []
        self.calls: dict[int, dict] = {}
        self.finish_reason: str | None = None
        self.usage = Usage()

    def add(self, chunk: ChatChunk) -> None:
        self.id = self.id or chunk.id
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            self.finish_reason = choice.finish_reason or self.finish_reason
            if choice.delta.content:
                self.text.append(choice.delta.content)
            for delta in choice.delta.tool_calls or []:
                self._add_call(delta)

    def _add_call(self, delta: dict) -> None:
        call = self.calls.setdefault(delta.get("index", 0), {"id": None, "name": "", "arguments": ""})
        call["id"] = call["id"] or delta.get("id")
        fn = delta.get("function") or {}
        call["name"] += fn.get("name") or ""
        call["arguments"] += fn.get("arguments") or ""

    def response(self) -> ChatResponse:
        return ChatResponse(choices=[Choice(message=self.message(), finish_reason=self.finish_reason)], usage=self.usage)

    def message(self) -> AssistantMessage:
        calls = [ToolCall(**({"id": c["id"]} if c["id"] else {}), function={"name": c["name"], "arguments": c["arguments"]})
                 for _, c in sorted(self.calls.items())]
        return AssistantMessage(content="".join(self.text) or None, tool_calls=calls or None)

