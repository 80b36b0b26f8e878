"""The OpenAI wire protocol at the proxy's edge: error bodies, request parsing, and SSE chunks in OpenAI's shape.

Pure functions: `app/server/routes.py` does the HTTP. What a client sends is parsed into a ChatRequest here (a
malformed body or field is a 400 with pydantic's errors rendered, never a 500), and what the Router streams is
turned into exactly the chunks OpenAI sends: no `slmswap` field, usage only on the final `choices: []` chunk and
only when `stream_options.include_usage` asked for it.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import orjson
from pydantic import ValidationError

from app.errors import SlmSwapError, UsageError
from app.wire import ChatChunk, ChatRequest, ChatResponse, ErrorBody, ErrorResponse

log = logging.getLogger("slmswap.server")

# Fields we accept and pass on (or use); anything else a client sends is logged once and ignored.
USED = set(ChatRequest.model_fields) | {"stream_options"}
_IGNORED_SEEN: set[str] = set()
_IGNORED_LOCK = threading.Lock()


class HTTPProblem(SlmSwapError):
    """An error with an explicit HTTP status (401, 404, 413, 429), rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, error_type: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.http_status, self.error_type, self.code, self.param = status, error_type, code, param
        self.headers = headers or {}


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> dict:
    return ErrorResponse(error=ErrorBody(message=message, type=error_type, param=param, code=code)).model_dump()


def error_for(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, OpenAI error body, headers) for any exception; ours keep their status, anything else is a 500."""
    if isinstance(exc, HTTPProblem):
        return exc.http_status, error_body(str(exc), exc.error_type, exc.code, exc.param), exc.headers
    if isinstance(exc, SlmSwapError):
        return exc.http_status, error_body(str(exc), exc.error_type, type(exc).__name__.lower()), {}
    return 500, error_body("internal error in slm-swap; the server log has the details", "server_error"), {}


def parse_request(raw: bytes) -> tuple[ChatRequest, dict[str, Any]]:
    """The ChatRequest a body holds, and the body as JSON; UsageError (a 400) when it is not one."""
    try:
        body = _loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"the request body is not valid JSON ({exc}); send a chat completions request") from None
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object with `model` and `messages`")
    if "model" not in body or "messages" not in body:
        missing = [k for k in ("model", "messages") if k not in body]
        raise UsageError(f"the request is missing {', '.join(missing)}; a chat completions request needs both")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise UsageError(f"invalid request: {render_errors(exc)}") from None
    check_supported(req, body)
    note_ignored(body)
    return req, body


def _loads(raw: bytes) -> Any:
    """orjson for speed; the standard library where orjson refuses (an integer over 64 bits, NaN) and for the
    error message, so a body parses exactly as `json.loads` would parse it."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def render_errors(exc: ValidationError, limit: int = 3) -> str:
    """pydantic's errors as one line: `messages.0.role: Input should be 'system', ... (got 'robot')`."""
    parts = []
    for e in exc.errors()[:limit]:
        where = ".".join(map(str, e["loc"])) or "body"
        got = f" (got {json.dumps(e.get('input'), default=str)[:60]})" if "input" in e else ""
        parts.append(f"{where}: {e['msg']}{got}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def check_supported(req: ChatRequest, body: dict[str, Any]) -> None:
    if req.n not in (None, 1):
        raise UsageError(f"n={req.n} is not supported; slm-swap returns one choice (n=1)")
    if not req.messages:
        raise UsageError("messages is empty; send at least one message")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise UsageError("stream_options must be an object, e.g. {\"include_usage\": true}")


def note_ignored(body: dict[str, Any]) -> None:
    """Log each field we accept but ignore, once per field per process."""
    new = []
    with _IGNORED_LOCK:
        for key in body:
            if key not in USED and key not in _IGNORED_SEEN:
                _IGNORED_SEEN.add(key)
                new.append(key)
    for key in new:
        log.warning("request field %r is accepted but ignored by slm-swap (logged once)", key)


def include_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def response_json(resp: ChatResponse, model: str) -> dict[str, Any]:
    """The response as OpenAI sends it: `model` is the route the client named, our call info stays in headers."""
    data = resp.model_dump(exclude={"slmswap"}, exclude_none=True)
    data["model"] = model
    data["usage"].pop("source", None)
    for choice, original in zip(data["choices"], resp.choices):
        choice.pop("confidence", None)  # ours: it travels in the x-slmswap-confidence header
        choice["logprobs"] = original.logprobs.model_dump() if original.logprobs is not None else None
        choice["message"].setdefault("content", None)
    return data


def sse_chunks(chunk: ChatChunk, model: str) -> list[dict[str, Any]]:
    """What one Router chunk becomes on the wire: usage and call info stripped (the final usage chunk is the
    caller's, see `usage_chunk`); the Router's closing info-only chunk becomes nothing."""
    data = chunk.model_dump(exclude={"slmswap", "usage"}, exclude_none=True)
    data["model"] = model
    data["choices"] = [c for c in data["choices"] if c.get("delta") or c.get("finish_reason")]
    for choice in data["choices"]:
        choice.setdefault("logprobs", None)
        choice.setdefault("finish_reason", None)
    return [data] if data["choices"] else []


def usage_chunk(chunk_id: str, created: int, model: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with `include_usage`: `choices` is empty, `usage` the call's."""
    usage = {k: v for k, v in usage.items() if k != "source"}
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"
