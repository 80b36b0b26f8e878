"""An OpenAI-shaped upstream that misbehaves on demand, for the backend boundary and (later) the proxy's fallbacks.

    faults = Faults()
    faults.enqueue("html", "status:429:retry-after=0", "ok")    # one behaviour per request, then "ok"
    with serve(faults.app()) as url: ...

Behaviours: ok, malformed_json, html, no_usage, null_usage, no_choices, finish:<reason>, status:<code>[:retry-after=S],
echo_key:<code> (an error body that quotes the request's Authorization header), stall (never answers while the
client stays connected: the client's timeout ends the call; `faults.stopping.set()` releases it).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response


def completion(model: str, content: str = "pong", finish: str = "stop", usage: object = "default") -> dict:
    body = {"id": "c1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]}
    if usage == "default":
        body["usage"] = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    elif usage is not None:
        body["usage"] = usage
    return body


class Faults:
    def __init__(self) -> None:
        self.plan: deque[str] = deque()
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def enqueue(self, *behaviours: str) -> "Faults":
        with self.lock:
            self.plan.extend(behaviours)
        return self

    def next(self) -> str:
        with self.lock:
            return self.plan.popleft() if self.plan else "ok"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            auth = request.headers.get("authorization") or request.headers.get("api-key") or ""
            self.seen.append({"body": body, "auth": auth})
            return await self.answer(self.next(), body, auth, request)

        return app

    async def answer(self, behaviour: str, body: dict, auth: str, request: Request) -> Response:
        model = body.get("model", "m")
        kind, _, arg = behaviour.partition(":")
        if kind == "ok":
            return JSONResponse(completion(model))
        if kind == "malformed_json":
            return Response('{"id": "c1", "choices": [', media_type="application/json")
        if kind == "html":
            return PlainTextResponse("<html><body>502 Bad Gateway</body></html>", media_type="text/html")
        if kind == "no_usage":
            return JSONResponse(completion(model, usage=None))
        if kind == "null_usage":
            data = completion(model, usage=None)
            data["usage"] = None
            return JSONResponse(data)
        if kind == "no_choices":
            return JSONResponse({**completion(model), "choices": []})
        if kind == "finish":
            return JSONResponse(completion(model, finish=arg))
        if kind == "status":
            code, _, retry = arg.partition(":retry-after=")
            headers = {"retry-after": retry} if retry else {}
            return JSONResponse({"error": {"message": f"status {code} on purpose", "type": "server_error"}},
                                status_code=int(code), headers=headers)
        if kind == "echo_key":
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')}",
                                           "type": "invalid_request_error"}}, status_code=int(arg or 401))
        if kind == "stall":
            while not self.stopping.is_set() and not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return JSONResponse(completion(model))
        raise ValueError(f"unknown behaviour {behaviour!r}")
