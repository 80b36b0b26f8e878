"""`slmswap serve`: the OpenAI-compatible HTTP proxy over the Router. Only HTTP lives here: the wire protocol is
`protocol.py`, keys are `auth.py`, the decisions (rollout, fallback, capture) are the Router's, exactly as for a
graph node.

    POST /v1/chat/completions   GET /v1/models   POST /v1/feedback   GET /healthz   GET /metrics
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol
from urllib.parse import quote

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import Settings
from app.errors import SlmSwapError, UsageError
from app.observability import client as observability_client
from app.observability import observe_call
from app.observability import shutdown as shutdown_observability
from app.routing.context import CallContext
from app.server.auth import check_key
from app.server.metrics import ProxyMetrics
from app.server.schedule import Periodic, run_periodic
from app.server.protocol import (HTTPProblem, error_body, error_for, include_usage, parse_request, response_json, sse,
                                 sse_chunks, usage_chunk)
from app.services import Services
from app.wire import CallInfo, ChatChunk, ChatRequest, Message

log = logging.getLogger("slmswap.server")
CHAT_PATH = "/v1/chat/completions"
SESSION_HEADER = "x-slmswap-session"
CAPTURE_HEADER = "x-slmswap-capture"
_HEADER_SAFE = "".join(chr(c) for c in range(33, 127) if chr(c) != "%")  # printable ASCII stays as it is


class Prompts(Protocol):
    """Templates for proxy calls (prompts/store.py's ProxyPrompts, given by the composition root)."""

    def for_proxy(self, route: str, system: str | None, managed: bool, tools: list[dict] | None = None,
                  tool_choice: Any = None) -> tuple[str | None, str | None]:
        """(the template id the call counts on, the system text to send instead of the client's, or None)."""
        ...

    def known(self, route: str, system: str | None, managed: bool) -> tuple[str | None, str | None] | None:
        """`for_proxy`'s answer when it needs no store (an unmanaged route's absent or already seen prompt), else
        None: the request path then skips the worker thread."""
        ...


class Proxy:
    """What the endpoints share: settings, the services (store + Router), per-route in-flight counts, metrics."""

    def __init__(self, settings: Settings, services: Services, prompts: Prompts | None = None):
        self.settings, self.services, self.prompts = settings, services, prompts
        self.router = services.router
        self.in_flight: Counter[str] = Counter()
        self.metrics = ProxyMetrics()
        self.metrics.watch(self.router)
        # Langfuse keys are read once: a server's environment and config do not change while it serves, and reading
        # them costs more per request than the rest of the request's bookkeeping.
        self.traced = observability_client(settings) is not None
        self.routes = frozenset(settings.route_names())  # the settings do not change while the server runs
        self.managed = frozenset(name for name, route in settings.routes.items() if route.managed_prompt)

    # ---- request checks --------------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> str | None:
        """The caller's key hash; 401 when keys are configured and the request has none of them."""
        hashes = self.settings.proxy.api_keys
        if not hashes:
            return None
        caller = check_key(request.headers.get("authorization"), hashes)
        if caller is None:
            given = "no API key" if not request.headers.get("authorization") else "an API key that is not configured"
            raise HTTPProblem(401, f"the request has {given}; send Authorization: Bearer <key> (make keys with "
                                   "`slmswap keys new`)", "invalid_request_error", "invalid_api_key")
        return caller

    async def body(self, request: Request) -> bytes:
        limit = self.settings.proxy.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise self._too_large(int(declared), limit)
        chunks, size, more = [], 0, True
        while more:  # the ASGI messages themselves: Request.stream() is a generator around the same loop
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > limit:
                raise self._too_large(size, limit)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, size: int, limit: int) -> HTTPProblem:
        return HTTPProblem(413, f"the request body is {size:,} bytes or more, over the limit of {limit:,}; send less "
                                "or raise [proxy] max_body_bytes", "invalid_request_error", "request_too_large")

    def route_of(self, model: str) -> str:
        if model in self.routes or self.settings.proxy.open_routes:
            return model
        names = self.settings.route_names()
        raise HTTPProblem(404, f"model {model!r} names no route; the routes are: {', '.join(names)} (or set [proxy] "
                               "open_routes = true to create routes on first use)", "invalid_request_error",
                          "model_not_found", "model")

    def context(self, request: Request, req: ChatRequest, route: str, caller: str | None) -> CallContext:
        """Who is calling, from what the proxy knows: never from client-written metadata fields of ours."""
        sticky = request.headers.get(SESSION_HEADER) or req.user or caller
        opted_out = (request.headers.get(CAPTURE_HEADER, "").lower() in ("off", "false", "0")
                     or str((req.metadata or {}).get("capture", "")).lower() in ("off", "false", "0"))
        return CallContext(route=route, source="proxy", sticky_key=sticky, capture=not opted_out, caller=caller)

    async def template(self, req: ChatRequest, ctx: CallContext) -> tuple[ChatRequest, CallContext]:
        """The template the call counts on (its system prompt's fingerprint) and, where the route has
        `managed_prompt`, the request with the selected template in place of the client's system prompt."""
        managed = ctx.route in self.managed
        if self.prompts is None or self.services.store is None or not (ctx.capture or managed):
            return req, ctx
        system = next((m for m in req.messages if m.role in ("system", "developer")), None)
        system_text = system.text() if system else None
        answer = self.prompts.known(ctx.route, system_text, managed)
        if answer is None:  # a new prompt (stored on first sight) or a managed route (sampled from the store)
            answer = await asyncio.to_thread(self.prompts.for_proxy, ctx.route, system_text, managed,
                                             req.tool_dicts(), req.tool_choice)
        template_id, text = answer
        if text is not None:
            rest = [m for m in req.messages if m is not system]
            req = req.model_copy(update={"messages": [Message(role="system", content=text), *rest]})
        return req, ctx.but(template_id=template_id)

    def slot(self, route: str) -> None:
        if self.in_flight[route] >= self.settings.proxy.max_concurrency:
            raise HTTPProblem(429, f"route {route!r} has {self.in_flight[route]} requests in flight, its limit; retry "
                                   "shortly or raise [proxy] max_concurrency", "rate_limit_exceeded",
                              "too_many_requests", headers={"Retry-After": "1"})
        self.in_flight[route] += 1

    def release(self, route: str) -> None:
        self.in_flight[route] -= 1

    # ---- answering -------------------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        caller = self.authenticate(request)
        req, body = parse_request(await self.body(request))
        route = self.route_of(req.model)
        ctx = self.context(request, req, route, caller)
        req, ctx = await self.template(req, ctx)
        self.slot(route)
        try:
            if req.stream:
                return await self.stream(req, body, ctx, started)
            if self.traced:
                with observe_call(self.settings, req, route=route) as observation:
                    resp = await self.router.complete(req, ctx)
                    observation.finish(resp)
            else:
                resp = await self.router.complete(req, ctx)
        except BaseException as exc:
            self.release(route)
            if isinstance(exc, Exception):
                self.metrics.failed(route, getattr(exc, "error_type", "server_error"), time.perf_counter() - started)
            raise
        self.release(route)
        self.metrics.answered(resp.slmswap, route, resp.usage, time.perf_counter() - started)
        headers = who(resp.slmswap)
        if resp.choices[0].confidence is not None:
            headers["x-slmswap-confidence"] = f"{resp.choices[0].confidence:.4f}"
        # orjson: a third of json.dumps' time, and a non-finite number (a -inf logprob) becomes null, not a 500
        return Response(orjson.dumps(response_json(resp, req.model)), media_type="application/json", headers=headers)

    async def stream(self, req: ChatRequest, body: dict[str, Any], ctx: CallContext, started: float) -> Response:
        """SSE in OpenAI's shape. Errors before the first chunk are a normal error response; after it, an error
        event and [DONE] (the status line has gone out)."""
        chunks = self.router.stream(req, ctx)
        released = False

        def release_once() -> None:
            nonlocal released
            if not released:
                released = True
                self.release(ctx.route)

        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise SlmSwapError("the model sent nothing") from None
        created = first.created

        async def events():
            info: CallInfo | None = first.slmswap
            usage = None
            try:
                async for chunk in _prepend(first, chunks):
                    if not chunk.choices and chunk.slmswap is not None:  # the Router's closing chunk
                        info, usage = chunk.slmswap, chunk.usage
                        continue
                    for data in sse_chunks(chunk, req.model):
                        yield sse(data)
                if include_usage(body) and usage is not None:
                    yield sse(usage_chunk(first.id, created, req.model, usage.model_dump()))
                self.metrics.answered(info, ctx.route, usage, time.perf_counter() - started)
                # The call is over (captured): free the slot before the last event, or a client that sends its
                # next request the moment it reads [DONE] could find the slot still taken.
                release_once()
                yield sse("[DONE]")
            except SlmSwapError as exc:
                _, error, _ = error_for(exc)
                self.metrics.failed(ctx.route, exc.error_type, time.perf_counter() - started)
                release_once()
                yield sse(error)
                yield sse("[DONE]")
            finally:
                # A client that went away cancels this generator; closing the Router's stream cancels the model's
                # and captures the call as aborted. Shielded: the cancellation must not cut the closing short.
                await asyncio.shield(chunks.aclose())
                release_once()

        # The background task frees the route's slot even when the body never started (a client gone at once).
        return StreamingResponse(events(), media_type="text/event-stream", headers=who(first.slmswap),
                                 background=BackgroundTask(release_once))


async def _prepend(first: ChatChunk, rest):
    yield first
    async for chunk in rest:
        yield chunk


def who(info: CallInfo | None) -> dict[str, str]:
    """The headers that name who answered a call, and the template it counted on (when it used one)."""
    if info is None:
        return {}
    headers = {"x-slmswap-call-id": info.call_id, "x-slmswap-binding": info.binding, "x-slmswap-role": info.role}
    if info.template_id:  # an id holds the route name, which a client may write: non-ASCII is percent-encoded
        headers["x-slmswap-template"] = quote(info.template_id, safe=_HEADER_SAFE)
    return headers


def create_app(settings: Settings, services: Services | None = None, prompts: Prompts | None = None,
               periodic: Sequence[Periodic] = ()) -> FastAPI:
    """The proxy as an ASGI app; `services` (store + Router) are opened here unless given. `prompts` turns system
    prompts into counted templates (`slmswap serve` passes prompts/store.py's ProxyPrompts); `periodic` jobs run
    in the background while it serves."""
    services = services or Services.from_settings(settings)
    proxy = Proxy(settings, services, prompts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        jobs = [asyncio.create_task(run_periodic(p)) for p in periodic]
        yield
        for job in jobs:
            job.cancel()
        await proxy.router.drain()
        services.close()
        shutdown_observability()  # flush what Langfuse has buffered

    # FastAPI's own OpenTelemetry middleware is off: once Langfuse installs a tracer provider it would trace every
    # HTTP request beside our one generation per call, and it costs a share of the added latency even when idle.
    app = FastAPI(title="slm-swap proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.proxy = proxy
    _errors(app)

    # The route is declared (so a GET gets its 405), but POSTs are answered by ChatFastPath before Starlette's
    # exception middleware, routing and request/response wrappers: work per request for an endpoint that reads its
    # own body and renders its own responses and errors.
    app.add_route(CHAT_PATH, proxy.chat, methods=["POST"])
    app.add_middleware(ChatFastPath, proxy=proxy)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        proxy.authenticate(request)
        names = settings.route_names()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slm-swap"}
                                           for n in names]}

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict:
        proxy.authenticate(request)
        return await asyncio.to_thread(_store_feedback, services, await proxy.body(request))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "routes": len(settings.route_names()), "capture": services.store is not None}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        proxy.authenticate(request)  # route names and spend are not for anyone who can reach the port
        text = await asyncio.to_thread(proxy.metrics.render, proxy.router, settings.route_names())
        return Response(text, media_type="text/plain; version=0.0.4")

    return app


def _store_feedback(services: Services, raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError('the feedback body is not JSON; send {"call_id": "...", "success": true}') from None
    if not isinstance(body, dict) or not isinstance(body.get("call_id"), str):
        raise UsageError('feedback needs "call_id" (the x-slmswap-call-id of a response)')
    score, success, comment = body.get("score"), body.get("success"), body.get("comment")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise UsageError('"score" must be a number')
    if success is not None and not isinstance(success, bool):
        raise UsageError('"success" must be true or false')
    if comment is not None and not isinstance(comment, str):
        raise UsageError('"comment" must be a string')
    if services.store is None:
        raise HTTPProblem(409, "this server captures nothing, so there is no call to attach feedback to",
                          "invalid_request_error", "capture_off")
    try:
        feedback_id = services.store.add_feedback(body["call_id"], score=score, success=success, comment=comment)
    except UsageError as exc:
        if "no captured call" in str(exc):
            raise HTTPProblem(404, str(exc), "invalid_request_error", "call_not_found", "call_id") from None
        raise
    return {"id": feedback_id, "call_id": body["call_id"], "object": "feedback"}


class ChatFastPath:
    """ASGI middleware that answers `POST /v1/chat/completions` itself, with the same error rendering as the
    app's exception handlers (`error_for`); every other request goes on to the app."""

    def __init__(self, app, proxy: Proxy):
        self.app, self.proxy = app, proxy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != CHAT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self.proxy.chat(request)
        except Exception as exc:  # noqa: BLE001 - rendered as OpenAI's error body, as the exception handlers do
            response = error_response(request, exc)
        await response(scope, receive, send)


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """OpenAI's error body with the right status; anything but our own errors is a defect of ours (logged),
    never the client's input."""
    if not isinstance(exc, SlmSwapError):
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
    status, body, headers = error_for(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _errors(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error body with the right status; nothing a client sends gives a 500."""

    @app.exception_handler(SlmSwapError)
    async def ours(request: Request, exc: SlmSwapError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {exc.errors()[:2]}", "invalid_request_error"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no endpoint {request.url.path}; the proxy serves /v1/chat/completions, /v1/models, "
                        "/v1/feedback, /healthz and /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, "invalid_request_error"), exc.status_code)
