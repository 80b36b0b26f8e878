"""The Router: every model call in the system goes through here, from a graph node or from the proxy.

For each call it decides who answers (`rollout.decide`: teacher, student, or teacher with a shadow student), makes
the attempt (backend call → response + verdict, priced), falls back to the teacher when the student errs, times
out, answers invalidly or without confidence, and records every attempt of the call (primary, fallback, shadow)
linked by parent call id. Capture is durable before a call returns; shadows run off the response path.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from app.backends.base import BACKENDS, BackendCache
from app.bindings import Binding
from app.capture.records import CallRecord, Role, request_payload, response_payload
from app.config import Settings
from app.cost import cost_usd
from app.errors import BackendError, BadReply, SlmSwapError
from app.repair import repair_response
from app.routing.breaker import Breakers, CircuitOpen
from app.routing.context import CallContext
from app.routing.rollout import agreement, decide, judge_stage
from app.routing.routes import Route, RouteStates, gates
from app.validation import Verdict, validate_answer
from app.wire import AssistantMessage, CallInfo, ChatChunk, ChatRequest, ChatResponse, Choice, ToolCall, Usage


def new_id() -> str:
    """A random 128-bit id in hex, as uuid4().hex gives but a fifth of its cost (it is made on every call)."""
    return os.urandom(16).hex()


JUDGE_PROMPT = ("You compare two answers to the same request. Reply with JSON {\"agree\": true} when they say the "
                "same thing (wording may differ), else {\"agree\": false}.")


@dataclass
class Attempt:
    """One backend call of a call: its response (or error) and its verdict, already captured."""

    role: Role
    info: CallInfo
    response: ChatResponse | None = None
    error: SlmSwapError | None = None
    verdict: Verdict | None = None

    @property
    def failure(self) -> str | None:
        """Why this answer cannot stand (error, timeout, invalid, confidence), or None."""
        if self.error is not None:
            return "timeout" if self.info.error_type == "timeout" else "error"
        if not self.info.valid:
            return "confidence" if self.info.error_type == "low_confidence" else "invalid"
        return None

    def result(self) -> ChatResponse:
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


class Router:
    def __init__(self, settings: Settings, store: Any | None = None, backends: BackendCache = BACKENDS):
        self.settings = settings
        self.store = store  # a CaptureStore, or None to capture nothing
        self.backends = backends
        self.states = RouteStates(settings, store)
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (kind, route, reason): fallbacks, shed shadows
        self._judged: Counter[str] = Counter()
        self._shadows: set[asyncio.Task] = set()
        self._judging: set[asyncio.Future] = set()  # gate checks run in worker threads, off the request path
        self.breakers = Breakers()  # per binding: skip one that keeps failing, probe it after a cool-down

    def route(self, name: str) -> Route:
        return self.states.get(name)

    async def aroute(self, name: str) -> Route:
        """`route` for the request path: the store is re-read (at most every REFRESH_S) in a worker thread."""
        if self.states.fresh():
            return self.states.get(name)
        return await asyncio.to_thread(self.states.get, name)

    # ---- one call ----------------------------------------------------------------------------------------

    async def complete(self, req: ChatRequest, ctx: CallContext | None = None) -> ChatResponse:
        """Answer one chat request on its route; the response carries `slmswap` call info (who answered).

        Every attempt is captured, failed and aborted ones included; whatever a backend throws reaches the caller
        as an SlmSwapError (cancellation is captured as `aborted` and re-raised as it is).
        """
        ctx = ctx or CallContext(route=req.model)
        route = await self.aroute(ctx.route)
        decision = decide(route.name, route.stage, route.student is not None, ctx.sticky_key or new_id())
        if decision.student_answers:
            first = await self._attempt(req, ctx, route, "student", route.student)
            if first.failure is None:
                return first.result()
            self.counts["fallback", route.name, first.failure] += 1
            return (await self._attempt(req, ctx, route, "teacher", route.teacher, parent=first)).result()
        primary = await self._attempt(req, ctx, route, "teacher", route.teacher)
        if decision.shadow and primary.response is not None:
            self._start_shadow(req, ctx, route, primary)
        return primary.result()

    async def stream(self, req: ChatRequest, ctx: CallContext | None = None) -> AsyncIterator[ChatChunk]:
        """Stream one chat request. The first chunk carries the call info (who answers), the last one has no
        choices and carries the usage and the final call info.

        A student's stream is held until it validates when the request has tools or a response_format (so the
        teacher can still answer instead); plain text streams at once and falls back only when the student fails
        before its first chunk. After the first chunk has gone out an error ends the stream.
        """
        ctx = ctx or CallContext(route=req.model)
        route = await self.aroute(ctx.route)
        decision = decide(route.name, route.stage, route.student is not None, ctx.sticky_key or new_id())
        if decision.student_answers:
            structured = bool(req.tools or req.response_format)
            held: list[ChatChunk] = []
            student = _StreamAttempt(self, req, ctx, route, "student", route.student, held if structured else None)
            async with aclosing(student.run()) as chunks:  # a consumer that leaves closes the attempt (aborted)
                async for chunk in chunks:
                    yield chunk
            if student.attempt.failure is None or (student.sent and student.attempt.error is None):
                for chunk in held:
                    yield chunk
                yield student.closing()
                return
            if student.sent:  # plain text already went out: nothing can replace it now
                raise student.attempt.error
            self.counts["fallback", route.name, student.attempt.failure] += 1
            teacher = _StreamAttempt(self, req, ctx, route, "teacher", route.teacher, None, parent=student.attempt)
        else:
            teacher = _StreamAttempt(self, req, ctx, route, "teacher", route.teacher, None)
        async with aclosing(teacher.run()) as chunks:
            async for chunk in chunks:
                yield chunk
        if teacher.attempt.error is not None:
            raise teacher.attempt.error
        if decision.shadow and teacher.attempt.response is not None:
            self._start_shadow(req, ctx, route, teacher.attempt)
        yield teacher.closing()

    # ---- attempts ----------------------------------------------------------------------------------------

    async def _attempt(self, req: ChatRequest, ctx: CallContext, route: Route, role: Role, binding: Binding,
                       parent: Attempt | None = None, reference: Attempt | None = None) -> Attempt:
        info = self._info(ctx, route, role, binding)
        started = time.perf_counter()
        try:
            self.breakers.check(binding.name)
            resp = checked_reply(binding, await self.backends.get(binding).complete(req))
        except BaseException as exc:
            return await self._capture_failure(self._failed(req, ctx, route, info, started, exc, parent))
        self.breakers.record(binding.name, ok=True)
        info.latency_ms = (time.perf_counter() - started) * 1000
        attempt = await self._judge(req, ctx, route, info, binding, resp, parent, reference)
        attempt.response.model, attempt.response.slmswap = binding.name, info
        return attempt

    def _info(self, ctx: CallContext, route: Route, role: Role, binding: Binding) -> CallInfo:
        return CallInfo(call_id=new_id(), route=route.name, binding=binding.name, role=role,
                        template_id=ctx.template_id)

    async def _judge(self, req: ChatRequest, ctx: CallContext, route: Route, info: CallInfo, binding: Binding,
                     resp: ChatResponse, parent: Attempt | None, reference: Attempt | None) -> Attempt:
        """Repair (where the route asks), validate, price and capture a finished attempt."""
        raw, repairs = resp, []
        if route.repair:
            resp, repairs = repair_response(req, resp)
        verdict = verdict_of(req, resp)
        usage = resp.usage
        confidence = resp.choices[0].confidence
        if (verdict.valid and info.role != "teacher" and route.min_confidence is not None
                and isinstance(confidence, (int, float)) and confidence < route.min_confidence):
            verdict = Verdict(False, "low_confidence",
                              f"mean token log-probability {confidence:.3f} is under the route's {route.min_confidence}")
        info.valid, info.error_type, info.error_detail = verdict.valid, verdict.error_type, verdict.detail
        rate, seconds = self.settings.cost.usd_per_hour, info.latency_ms / 1000
        info.cost_usd = cost_usd(binding, usage.prompt_tokens, usage.completion_tokens, seconds, rate)
        agreed = agreement(reference.verdict, verdict, bool(req.response_format)) if reference and reference.verdict else None
        if agreed is None and reference is not None and reference.verdict and reference.verdict.valid and verdict.valid:
            agreed = await self._judge_text(req, reference.response, resp)
        # A local teacher is priced on this attempt's compute time: the best estimate there is of its own.
        teacher_cost = info.teacher_cost_usd = cost_usd(route.teacher, usage.prompt_tokens, usage.completion_tokens,
                                                        seconds, rate)
        payload = response_payload(resp)
        if repairs:  # the raw output stays measurable beside the repaired one
            payload.update(raw=response_payload(raw), repairs=repairs)
        record = self._record(req, ctx, info, payload, usage, teacher_cost, parent, agreed)
        if self.store is not None and ctx.capture:
            await self._store_record(record)
        self._after_judged(route, info.role)
        return Attempt(info.role, info, resp, verdict=verdict)

    async def _capture_failure(self, failed: tuple[Attempt, CallRecord | None]) -> Attempt:
        attempt, record = failed
        if record is not None:
            await self._store_record(record)
        return attempt

    async def _store_record(self, record: CallRecord) -> None:
        """A proxy call is durable at one journal write (the response must not wait for the commit); any other
        caller waits for the commit without blocking its event loop (a graph under `langgraph dev` is checked
        for blocking calls, and reads its own calls right after)."""
        if record.source == "proxy":
            await self.store.arecord_durable(record)
        else:
            await self.store.arecord(record)

    def _failed(self, req: ChatRequest, ctx: CallContext, route: Route, info: CallInfo, started: float,
                exc: BaseException, parent: Attempt | None,
                partial: ChatResponse | None = None) -> tuple[Attempt, CallRecord | None]:
        """A failed attempt and the record the caller must await; an abort (cancellation, a closed stream) is
        queued for capture without waiting and re-raised at once: there may be no event loop turn left for it."""
        aborted = not isinstance(exc, Exception)  # CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit
        error = exc if aborted or isinstance(exc, SlmSwapError) else BackendError(
            f"{info.binding} failed: {type(exc).__name__}: {str(exc)[:300]}")
        info.valid, info.latency_ms = False, (time.perf_counter() - started) * 1000
        info.error_type = "aborted" if aborted else getattr(error, "capture_type", "backend_error")
        info.error_detail = ("the caller went away before the answer was complete" if aborted else str(error))[:2000]
        response = response_payload(partial) if partial is not None and aborted else None
        record = self._record(req, ctx, info, response, Usage(), 0.0, parent, None)
        keep = self.store is not None and ctx.capture
        if aborted:
            if keep:
                self.store.record_soon(record)
            raise exc
        if not isinstance(error, CircuitOpen):
            self.breakers.record(info.binding, ok=False)
        self._after_judged(route, info.role)
        return Attempt(info.role, info, error=error), record if keep else None  # type: ignore[arg-type]

    def _record(self, req: ChatRequest, ctx: CallContext, info: CallInfo, response: dict | None, usage: Usage,
                teacher_cost: float, parent: Attempt | None, agreed: bool | None) -> CallRecord:
        return CallRecord(
            id=info.call_id, run_id=ctx.run_id, route=info.route, agent=ctx.agent_name,
            binding=info.binding, template_id=info.template_id, source=ctx.source,
            request=request_payload(req), response=response, valid=info.valid, error_type=info.error_type,
            error_detail=info.error_detail, latency_ms=info.latency_ms, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, cost_usd=info.cost_usd, teacher_cost_usd=teacher_cost,
            created_at=datetime.now(timezone.utc), role=info.role,
            parent_id=parent.info.call_id if parent else None,
            fallback_reason=parent.failure if parent and info.role == "teacher" else None,
            agreement=agreed, caller=ctx.caller,
        )

    async def _judge_text(self, req: ChatRequest, teacher: ChatResponse | None, student: ChatResponse) -> bool | None:
        """Free-text agreement by the configured judge binding (`[rollout] judge`); None without one, or when the
        judge fails (an unjudged shadow call counts for nothing either way)."""
        judge = self.settings.rollout.judge
        if not judge or teacher is None:
            return None
        question = ChatRequest(model="judge", temperature=0.0, max_tokens=16, messages=[
            {"role": "system", "content": JUDGE_PROMPT},
            {"role": "user", "content": f"Request:\n{req.messages[-1].text()[:4000]}\n\nAnswer A:\n"
                                        f"{(teacher.message.content or '')[:4000]}\n\nAnswer B:\n"
                                        f"{(student.message.content or '')[:4000]}"}],
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": {
                "type": "object", "properties": {"agree": {"type": "boolean"}}, "required": ["agree"],
                "additionalProperties": False}}})
        try:
            reply = await self.backends.get(self.settings.binding(judge)).complete(question)
            return bool(json.loads(reply.message.content or "")["agree"])
        except Exception:  # noqa: BLE001 - a judge that fails leaves the call unjudged
            return None

    # ---- shadows and gates -------------------------------------------------------------------------------

    def _start_shadow(self, req: ChatRequest, ctx: CallContext, route: Route, teacher: Attempt) -> None:
        """Run the student on the same request in the background; shed (and count) when enough are in flight."""
        if len(self._shadows) >= self.settings.rollout.shadow_concurrency:
            self.counts["shadow_shed", route.name, ""] += 1
            return
        task = asyncio.ensure_future(self._attempt(req, ctx, route, "shadow", route.student, parent=teacher,
                                                   reference=teacher))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def drain(self) -> None:
        """Wait for the shadow students and gate checks in flight (tests, and a server shutting down)."""
        while self._shadows or self._judging:
            pending = [*self._shadows, *self._judging]
            await asyncio.gather(*pending, return_exceptions=True)
            self._judging.difference_update(pending)

    def _after_judged(self, route: Route, role: Role) -> None:
        """Every `judge_every` judged student outcomes, read the route's gates and move it if they say so."""
        if role == "teacher" or self.store is None or not route.auto:
            return
        self._judged[route.name] += 1
        if self._judged[route.name] % self.settings.rollout.judge_every == 0:
            self._judging.add(asyncio.ensure_future(asyncio.to_thread(self.judge, route.name)))

    def judge(self, name: str):
        """Apply the gates to a route now; returns the stage change made, or None."""
        route = self.route(name)
        if self.store is None or route.since is None and route.stage == "teacher":
            return None
        since = route.since or datetime.min.replace(tzinfo=timezone.utc)
        outcomes = self.store.student_outcomes(name, since)
        change = judge_stage(name, route.stage, outcomes.successes, outcomes.trials, gates(self.settings))
        if change is None or not route.auto:
            return None
        evidence = {"successes": outcomes.successes, "trials": outcomes.trials, "rate": change.rate.rate,
                    "low": change.rate.low, "high": change.rate.high}
        self.states.set_stage(name, change.new, change.reason, evidence)
        return change


def verdict_of(req: ChatRequest, resp: ChatResponse) -> Verdict:
    """The answer's verdict against its request (`validate_answer`: cut structured output is invalid)."""
    message = resp.message
    tool_calls = [tc.model_dump() for tc in message.tool_calls or []]
    return validate_answer(content=message.content, tool_calls=tool_calls or None, finish_reason=resp.choices[0].finish_reason,
                           tools=req.tool_dicts() or None, tool_choice=req.tool_choice,
                           response_format=req.response_format, parallel_tool_calls=req.parallel_tool_calls)


def checked_reply(binding: Binding, resp: Any) -> ChatResponse:
    """The backend's reply, or BadReply when it is not a response with at least one choice."""
    if not isinstance(resp, ChatResponse) or not resp.choices:
        what = "no choices" if isinstance(resp, ChatResponse) else type(resp).__name__
        raise BadReply(f"{binding.name} answered with {what}, not a chat completion")
    return resp


class _StreamAttempt:
    """One streamed attempt: passes chunks on (or holds them), rebuilds the message, judges and captures it."""

    def __init__(self, router: Router, req: ChatRequest, ctx: CallContext, route: Route, role: Role,
                 binding: Binding, hold: list[ChatChunk] | None, parent: Attempt | None = None):
        self.router, self.req, self.ctx, self.route, self.binding = router, req, ctx, route, binding
        self.hold, self.parent = hold, parent
        self.info = router._info(ctx, route, role, binding)
        self.attempt = Attempt(role, self.info)
        self.acc = _StreamAccumulator()
        self.sent = False

    async def run(self) -> AsyncIterator[ChatChunk]:
        """The chunks to send now; afterwards `attempt` holds the judged result (or the error).

        A consumer that stops early (a client gone) closes this generator: the backend's stream is closed with it
        and the attempt is captured as aborted.
        """
        started = time.perf_counter()
        stream = None
        try:
            self.router.breakers.check(self.binding.name)
            stream = self.router.backends.get(self.binding).stream(self.req)
            async for chunk in stream:
                self.acc.add(chunk)
                chunk.model = self.binding.name
                if self.hold is not None:
                    self.hold.append(chunk)
                    continue
                if not self.sent:
                    chunk.slmswap = self.info  # the first chunk names who answers
                self.sent = True
                yield chunk
        except BaseException as exc:
            failed = self.router._failed(self.req, self.ctx, self.route, self.info, started, exc, self.parent,
                                         self.acc.response())
            self.attempt = await self.router._capture_failure(failed)
            return
        finally:
            if stream is not None:
                await stream.aclose()
        self.router.breakers.record(self.binding.name, ok=True)
        self.info.latency_ms = (time.perf_counter() - started) * 1000
        self.attempt = await self.router._judge(self.req, self.ctx, self.route, self.info, self.binding,
                                                self.acc.response(), self.parent, None)
        if self.hold and self.attempt.failure is None:
            self.hold[0].slmswap = self.info

    def closing(self) -> ChatChunk:
        """The last chunk: no choices, the usage, and the call info with its verdict."""
        return ChatChunk(id=self.acc.id or "chatcmpl-" + new_id(), model=self.binding.name, choices=[],
                         usage=self.acc.usage, slmswap=self.info)


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
