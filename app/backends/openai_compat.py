"""Azure OpenAI and any OpenAI-compatible server, through the `openai` SDK's async clients.

`azure:<deployment>` reads AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and OPENAI_API_VERSION (names overridable by
binding options); `openai:<model>` reads `base_url` and the key from the variable `api_key_env` names. The client is
built on first use, so a missing variable is reported when a route actually needs it, not at import.

A non-streamed call goes out through `app/backends/http1.py` (a bare keep-alive HTTP/1.1 POST of the body
serialized with orjson), not through the SDK, whose request transform and httpx's bookkeeping cost several times
what the rest of the proxy does (bench/proxy.py); its failures are raised as the SDK's own exception types, so
the retries and `_boundary` treat both paths alike. Streaming, and any call while an HTTP proxy is configured in the
environment (the SDK honours HTTP(S)_PROXY, the bare client does not), use the SDK.

Everything the SDK, httpx or the upstream can throw is mapped into `app/errors.py` in `_boundary`, and replies are
read by our own tolerant reader (`read_reply`), not trusted: servers that omit `usage`, send `finish_reason:
"function_call"` or answer a 200 with an HTML page give one clear error or a normalised reply, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from pydantic import ValidationError

from app.backends import degrade as degrade_mod
from app.backends.http1 import ConnectionFailed, HTTP1Pool, Reply
from app.backends.degrade import GAP_NAMES, Capabilities, Degraded, Gap, degrade
from app.backends.retry import with_retries
from app.bindings import Binding
from app.errors import BackendError, BadReply, MissingDependency, SlmSwapError, UpstreamTimeout
from app.secrets import register_secret
from app.wire import ChatChunk, ChatRequest, ChatResponse, Usage

# Our extensions and routing fields never go to the upstream server; stream settings are ours to set.
NOT_FORWARDED = {"model", "metadata", "decoding", "stream", "stream_options"}
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")
# What other servers say for the four OpenAI finish reasons (legacy OpenAI, Anthropic-style, llama.cpp, vLLM).
FINISH_ALIASES = {"function_call": "tool_calls", "tool_use": "tool_calls", "end_turn": "stop", "eos": "stop",
                  "stop_sequence": "stop", "max_tokens": "length", "abort": "stop"}
SHOWN = 200  # characters of a bad reply quoted in an error
# With any of these set the SDK (httpx) makes every call, as it honours them and the bare client does not.
PROXY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")
log = logging.getLogger(__name__)


class Unsupported(Exception):
    """The upstream refused a request for a capability it lacks (internal: caught, learned, degraded)."""

    def __init__(self, gap: Gap, detail: str):
        super().__init__(detail)
        self.gap, self.detail = gap, detail


class OpenAICompatBackend:
    def __init__(self, binding: Binding):
        self.binding = binding
        # One client per event loop: an async client's connection pool belongs to the loop that opened it, and
        # this backend outlives loops (Studio's workers, sync callers that run a private loop per call).
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Direct] = weakref.WeakKeyDictionary()
        # What the upstream supports: declared by the binding, the rest learned from its refusals (per instance).
        self.capabilities = Capabilities.of(binding.options)
        self._learning = threading.Lock()

    def client(self) -> Any:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            make = _azure_client if self.binding.kind == "azure" else _openai_client
            self._clients[loop] = make(self.binding)
        return self._clients[loop]

    def direct(self) -> _Direct | None:
        """The bare HTTP/1.1 path for this event loop; None when the SDK must make the call (an HTTP proxy)."""
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            if any(os.environ.get(name) for name in PROXY_ENV):
                return None
            pool = self._pools[loop] = _Direct.of(self.binding)
        return pool

    async def complete(self, req: ChatRequest) -> ChatResponse:
        with _boundary(self.binding):
            plan, resp = await self._attempt(req)
            if not plan.degraded:
                return resp
            judged = degrade_mod.verdict(req, resp)
            if judged.valid:
                return resp
            # One corrective retry, judged again by the Router with the original request's rules.
            _, resp = await self._attempt(degrade_mod.corrective(req, resp, judged, self.capabilities))
            return resp

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        if degrade(req, self.capabilities).degraded:
            yield as_chunk(await self.complete(req))  # a degraded reply is validated whole before it is sent on
            return
        payload = _payload(req)
        seen = 0
        try:
            with _boundary(self.binding):
                chunks = await with_retries(
                    lambda: self._refusal_checked(req, lambda: self.client().chat.completions.create(
                        model=self.binding.target, stream=True, stream_options={"include_usage": True}, **payload)),
                    self.binding.options.max_retries)
                async for chunk in chunks:
                    seen += 1
                    yield read_chunk(self.binding, chunk.model_dump())
                if not seen:
                    raise BadReply(f"{self.binding.name} ended its stream without sending a chunk; is the base_url "
                                   "an OpenAI-compatible /v1 endpoint?")
        except Unsupported as refused:  # refused before its first chunk: learned, then answered degraded
            self._learn(refused.gap, refused.detail)
            yield as_chunk(await self.complete(req))

    async def _attempt(self, req: ChatRequest) -> tuple[Degraded, ChatResponse]:
        """Send `req` as the upstream can take it; a refusal for a missing capability is learned and the same call
        sent again, degraded (at most once per capability)."""
        for tries_left in range(len(GAP_NAMES), -1, -1):
            plan = degrade(req, self.capabilities)
            try:
                return plan, self._read_back(plan, await self._send(plan.upstream))
            except Unsupported as refused:
                if not tries_left:
                    raise BackendError(f"{self.binding.name} failed ({refused.detail}) even degraded") from None
                self._learn(refused.gap, refused.detail)
        raise AssertionError("unreachable: the last try returns or raises")

    async def _send(self, req: ChatRequest) -> ChatResponse:
        payload = _payload(req)
        direct = self.direct()
        if direct is not None:
            body = orjson.dumps({"model": self.binding.target, **payload})
            reply = await with_retries(lambda: self._refusal_checked(req, lambda: direct.post(body)),
                                       self.binding.options.max_retries)
            return read_reply(self.binding, _json_body(self.binding, reply.content, reply.headers.get("content-type")))
        raw = await with_retries(
            lambda: self._refusal_checked(req, lambda: self.client().chat.completions.with_raw_response.create(
                model=self.binding.target, **payload)),
            self.binding.options.max_retries)
        http = raw.http_response
        return read_reply(self.binding, _json_body(self.binding, http.content, http.headers.get("content-type")))

    async def _refusal_checked(self, req: ChatRequest, call: Any) -> Any:
        """`await call()`, with a refusal for a capability not declared raised as Unsupported (never retried)."""
        import openai

        try:
            return await call()
        except openai.APIStatusError as exc:
            gap = degrade_mod.unsupported(req, exc.status_code, _full_message(exc))
            if gap is not None and getattr(self.capabilities, gap) is None:
                said = " ".join(_status_message(exc).split())  # one line: llama-cpp-python sends tracebacks
                raise Unsupported(gap, f"HTTP {exc.status_code}: {said or 'an empty error message'}") from None
            raise

    def _read_back(self, plan: Degraded, resp: ChatResponse) -> ChatResponse:
        if plan.single_call and len(resp.message.tool_calls or []) > 1:
            self._learn("parallel_tool_calls", "it answered parallel_tool_calls false with several calls")
            return degrade_mod.first_call_only(resp)
        return resp

    def _learn(self, gap: Gap, detail: str) -> None:
        with self._learning:
            if getattr(self.capabilities, gap) is not None:
                return  # declared, or learned already: said once
            self.capabilities = self.capabilities.lacking(gap)
        log.warning("%s does not support %s (%s); its calls are degraded from now on (see README, 'Upstreams that "
                    "speak only part of the protocol'); declare it in the binding to skip this probe",
                    self.binding.name, GAP_NAMES[gap], detail[:SHOWN])


def as_chunk(resp: ChatResponse) -> ChatChunk:
    """A whole reply as one stream chunk (a degraded call is answered whole, after it was checked)."""
    message = resp.message
    calls = [{"index": i, **c.model_dump()} for i, c in enumerate(message.tool_calls or [])]
    delta = {"role": "assistant", "content": message.content, "tool_calls": calls or None}
    return ChatChunk(id=resp.id, created=resp.created, model=resp.model, usage=resp.usage,
                     choices=[{"index": 0, "delta": delta, "finish_reason": resp.choices[0].finish_reason}])


def _payload(req: ChatRequest) -> dict[str, Any]:
    payload = req.model_dump(exclude_none=True, exclude=NOT_FORWARDED)
    for message in payload["messages"]:
        # An assistant turn that only calls tools goes with `content: ""`, which OpenAI takes: llama-cpp-python's
        # server rejects null and its chatml-function-calling template fails when the key is absent.
        if message["role"] == "assistant" and message.get("content") is None:
            message["content"] = ""
    return payload


# ---- the exception boundary ----------------------------------------------------------------------------------

@contextmanager
def _boundary(binding: Binding) -> Iterator[None]:
    """Map whatever the SDK, httpx or a reply throws into our tree. Cancellation passes through untouched."""
    import openai

    try:
        yield
    except (SlmSwapError, Unsupported):  # Unsupported is the backend's own, caught and learned by its caller
        raise
    except openai.APITimeoutError:
        opts = binding.options
        tries = f" ({opts.max_retries + 1} attempts)" if getattr(opts, "max_retries", 0) else ""
        raise UpstreamTimeout(f"{binding.name} timed out after {opts.timeout:g} s{tries}; raise the binding's "
                              f"timeout (e.g. {binding.name}?timeout=120) or check the server") from None
    except openai.APIStatusError as exc:
        raise BackendError(f"{binding.name} failed (HTTP {exc.status_code}): {_status_message(exc)}") from None
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        raise BackendError(f"{binding.name} failed (connection failed: {type(cause).__name__}: "
                           f"{str(cause)[:SHOWN]}); is the server at {_where(binding)} running?") from None
    except openai.APIError as exc:
        raise BadReply(f"{binding.name} sent a reply the openai SDK cannot read: {str(exc)[:SHOWN]}") from None
    except Exception as exc:  # a malformed stream event, a decode error inside the SDK, ...
        raise BadReply(f"{binding.name} sent a reply slm-swap cannot read ({type(exc).__name__}: "
                       f"{str(exc)[:SHOWN]})") from None


def _status_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
        if isinstance(message, str):
            return message[:SHOWN]
    return str(getattr(exc, "message", "") or type(exc).__name__)[:SHOWN]


def _full_message(exc: Any) -> str:
    """The whole error message (not cut to SHOWN): the word that names a missing capability may come late."""
    body = getattr(exc, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    return message if isinstance(message, str) else str(body or "")


def _where(binding: Binding) -> str:
    opts = binding.options
    return getattr(opts, "base_url", None) or f"${getattr(opts, 'endpoint_env', 'base_url')}"


# ---- reading replies -----------------------------------------------------------------------------------------

def _json_body(binding: Binding, content: bytes, content_type: str | None) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        pass
    try:  # what orjson refuses and the json module reads: NaN, integers over 64 bits
        return json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        shown = content[:80].decode("utf-8", "replace")
        raise BadReply(f"{binding.name} replied with a body that is not JSON (content-type {content_type or 'none'}): "
                       f"{shown!r}; is base_url the server's OpenAI-compatible /v1 endpoint?") from None


def read_reply(binding: Binding, data: Any) -> ChatResponse:
    """A chat completion from whatever JSON came back: checked, with the common deviations normalised."""
    if not isinstance(data, dict):
        raise BadReply(f"{binding.name} replied with JSON {type(data).__name__}, not a chat completion object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadReply(f"{binding.name} replied with no choices ({_shape(data)}); nothing to answer with")
    first = dict(choices[0])
    message = first.get("message")
    if not isinstance(message, dict):
        raise BadReply(f"{binding.name} replied with a choice that has no message ({_shape(first)})")
    first["message"] = _message(message)
    first["finish_reason"] = finish_reason(first.get("finish_reason"), bool(first["message"].get("tool_calls")))
    body = {**data, "choices": [first], "usage": read_usage(data.get("usage"))}
    try:
        return ChatResponse.model_validate(body)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"]))
        raise BadReply(f"{binding.name} replied in a shape slm-swap cannot read: {where}: {problem['msg']}") from None


def read_chunk(binding: Binding, data: dict[str, Any]) -> ChatChunk:
    for choice in data.get("choices") or []:
        if isinstance(choice, dict) and choice.get("finish_reason") is not None:
            calls = bool((choice.get("delta") or {}).get("tool_calls"))
            choice["finish_reason"] = finish_reason(choice["finish_reason"], calls)
    if data.get("usage") is not None:
        data["usage"] = read_usage(data["usage"])
    try:
        return ChatChunk.model_validate(data)
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise BadReply(f"{binding.name} streamed a chunk slm-swap cannot read: "
                       f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None


def _message(message: dict[str, Any]) -> dict[str, Any]:
    out = {**message, "role": "assistant"}
    content = message.get("content")
    if isinstance(content, list):  # content parts
        out["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict)) or None
    legacy = message.get("function_call")
    if not message.get("tool_calls") and isinstance(legacy, dict) and legacy.get("name"):
        out["tool_calls"] = [{"type": "function", "function": legacy}]
    for call in out.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and not isinstance(fn.get("arguments", ""), str):
            fn["arguments"] = json.dumps(fn["arguments"])  # some servers send the arguments as an object
    out.pop("function_call", None)
    return out


def finish_reason(value: Any, has_calls: bool) -> str:
    """One of OpenAI's four finish reasons for what a server said (`function_call` → `tool_calls`, ...)."""
    if value in FINISH_REASONS:
        return value
    if value in FINISH_ALIASES:
        return FINISH_ALIASES[value]
    return "tool_calls" if has_calls else "stop"


def read_usage(usage: Any) -> dict[str, Any]:
    """Token counts as reported; missing or malformed counts are recorded as unknown (`source="unknown"`)."""
    if not isinstance(usage, dict):
        return Usage(source="unknown").model_dump()
    counts = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}
    if not all(isinstance(v, int) and v >= 0 for v in counts.values()):
        return Usage(source="unknown").model_dump()
    total = usage.get("total_tokens")
    total = total if isinstance(total, int) else counts["prompt_tokens"] + counts["completion_tokens"]
    return {**usage, **counts, "total_tokens": total}


def _shape(data: dict[str, Any]) -> str:
    return "keys: " + ", ".join(list(data)[:8]) if data else "an empty object"


# ---- clients -------------------------------------------------------------------------------------------------

def _env(name: str, binding: Binding, hint: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise MissingDependency(f"{name} is not set; export it ({hint}) or bind the route to gguf:smollm2-135m "
                                f"(binding {binding.name})")
    return value


def _azure_client(binding: Binding) -> Any:
    from openai import AsyncAzureOpenAI

    opts = binding.options
    version = opts.api_version or os.environ.get("OPENAI_API_VERSION") or "2024-10-21"
    register_secret(os.environ.get(opts.api_key_env))  # before any call: an upstream may echo the key back
    return AsyncAzureOpenAI(
        azure_endpoint=_env(opts.endpoint_env, binding, "your resource's https://<name>.openai.azure.com"),
        api_key=_env(opts.api_key_env, binding, "the resource's key"),
        api_version=version, timeout=opts.timeout, max_retries=0,  # retries are ours (app/backends/retry.py)
    )


def _openai_client(binding: Binding) -> Any:
    from openai import AsyncOpenAI

    opts = binding.options
    key = os.environ.get(opts.api_key_env)
    register_secret(key)  # before any call: an upstream may echo the key back
    if not key and not opts.base_url:
        _env(opts.api_key_env, binding, "your API key, or set base_url for a local server")
    # Local OpenAI-compatible servers often need no key; the SDK insists on a non-empty string.
    return AsyncOpenAI(base_url=opts.base_url, api_key=key or "not-needed", timeout=opts.timeout, max_retries=0)


def _split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without `user:password@`, the Basic authorization header it implies): what httpx, and so the SDK's
    path, does with credentials in a base URL (they win over the bearer key)."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, {}
    netloc = parts.netloc.rpartition("@")[2]
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return (urlunsplit(parts._replace(netloc=netloc)),
            {"authorization": "Basic " + base64.b64encode(pair.encode()).decode()})


class _Direct:
    """One binding's bare HTTP/1.1 path on one event loop: the URL, the headers and a keep-alive pool.

    Failures are raised as the openai SDK's exceptions (built as its client builds them), so `with_retries`,
    `_refusal_checked` and `_boundary` see one exception tree whichever path made the call.
    """

    def __init__(self, pool: HTTP1Pool, path: str, headers: dict[str, str]):
        self.pool, self.path, self.headers = pool, path, headers

    @classmethod
    def of(cls, binding: Binding) -> _Direct:
        opts = binding.options
        base = {"content-type": "application/json", "accept": "application/json", "user-agent": "slm-swap"}
        if binding.kind == "azure":
            endpoint = _env(opts.endpoint_env, binding, "your resource's https://<name>.openai.azure.com")
            key = _env(opts.api_key_env, binding, "the resource's key")
            register_secret(key)
            version = opts.api_version or os.environ.get("OPENAI_API_VERSION") or "2024-10-21"
            url, basic = _split_credentials(endpoint.rstrip("/") + "/openai")
            return cls(HTTP1Pool(url, opts.timeout), f"/deployments/{binding.target}/chat/completions?api-version={version}",
                       {**base, "api-key": key, **basic})
        key = os.environ.get(opts.api_key_env)
        register_secret(key)  # before any call: an upstream may echo the key back
        if not key and not opts.base_url:
            _env(opts.api_key_env, binding, "your API key, or set base_url for a local server")
        base_url = opts.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        url, basic = _split_credentials(base_url)
        return cls(HTTP1Pool(url, opts.timeout), "/chat/completions",
                   {**base, "authorization": f"Bearer {key or 'not-needed'}", **basic})

    async def post(self, body: bytes) -> Reply:
        import openai

        try:
            reply = await self.pool.post(self.path, body, self.headers)
        except TimeoutError:
            raise openai.APITimeoutError(request=self._request()) from None
        except ConnectionFailed as exc:
            error = openai.APIConnectionError(message=str(exc), request=self._request())
            raise error from (exc.__cause__ or exc)
        if reply.status >= 400:
            raise _status_error(reply, self._request())
        return reply

    def _request(self) -> Any:
        import httpx2

        return httpx2.Request("POST", self.pool.url(self.path))


def _status_error(reply: Reply, request: Any) -> Exception:
    """The SDK's exception for an error status, as its client makes it (`_make_status_error`)."""
    import httpx2
    import openai

    response = httpx2.Response(reply.status, headers=reply.headers, content=reply.content, request=request)
    text = reply.content.decode("utf-8", "replace").strip()
    try:
        body: Any = orjson.loads(reply.content) if text else None
    except orjson.JSONDecodeError:
        body = text
    message = f"Error code: {reply.status} - {body if body is not None else text}"
    data = body.get("error", body) if isinstance(body, dict) else body
    kinds = {400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
             404: openai.NotFoundError, 409: openai.ConflictError, 422: openai.UnprocessableEntityError,
             429: openai.RateLimitError}
    kind = kinds.get(reply.status) or (openai.InternalServerError if reply.status >= 500 else openai.APIStatusError)
    return kind(message, response=response, body=data)
