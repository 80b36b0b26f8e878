"""The openai/azure backend through the real `openai` SDK against an OpenAI-shaped server on loopback."""

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.backends.openai_compat import OpenAICompatBackend
from app.bindings import parse_binding
from app.errors import BackendError, MissingDependency
from app.wire import ChatRequest
from tests.support.http import serve

SECRET = "sk-test-0123456789abcdefghijklmnop"


def upstream(seen: list):
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("authorization")})
        if body["messages"][-1]["content"] == "fail":
            return JSONResponse({"error": {"message": "upstream is down", "type": "server_error"}}, status_code=500)
        message = {"role": "assistant", "content": "pong"}
        if body.get("tools"):
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
        return {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}

    return app


def req(content="ping", **kw):
    return ChatRequest(model="route", messages=[{"role": "user", "content": content}],
                       metadata={"run_id": "r"}, decoding="free", **kw)


def test_openai_binding_talks_to_base_url_with_key_from_env(monkeypatch):
    seen = []
    monkeypatch.setenv("MY_KEY", SECRET)
    with serve(upstream(seen)) as url:
        backend = OpenAICompatBackend(parse_binding(f"openai:m1?base_url={url}/v1&api_key_env=MY_KEY"))
        resp = asyncio.run(backend.complete(req()))
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        called = asyncio.run(backend.complete(req(tools=tools)))
    assert resp.message.content == "pong" and resp.usage.total_tokens == 6
    assert called.message.tool_calls[0].parsed_arguments() == {"x": 1}
    assert seen[0]["body"]["model"] == "m1" and seen[0]["auth"] == f"Bearer {SECRET}"
    # our routing fields and extensions are not forwarded upstream
    assert not {"metadata", "decoding"} & set(seen[0]["body"])


def test_upstream_error_is_a_backend_error_without_the_key(monkeypatch):
    monkeypatch.setenv("MY_KEY", SECRET)
    with serve(upstream([])) as url:
        backend = OpenAICompatBackend(parse_binding(f"openai:m1?base_url={url}/v1&api_key_env=MY_KEY"))
        with pytest.raises(BackendError) as exc:
            asyncio.run(backend.complete(req("fail")))
    assert "HTTP 500" in str(exc.value) and SECRET not in str(exc.value)


def test_azure_without_endpoint_names_the_variable():
    backend = OpenAICompatBackend(parse_binding("azure:gpt-4o"))
    with pytest.raises(MissingDependency, match="AZURE_OPENAI_ENDPOINT is not set.*gguf:smollm2-135m"):
        asyncio.run(backend.complete(req()))


def test_azure_uses_deployment_and_api_version(monkeypatch):
    seen = []
    app = FastAPI()

    @app.post("/openai/deployments/{deployment}/chat/completions")
    async def chat(deployment: str, request: Request):
        seen.append({"deployment": deployment, "version": request.query_params.get("api-version"),
                     "key": request.headers.get("api-key")})
        return {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    with serve(app) as url:
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", url)
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
        monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
        resp = asyncio.run(OpenAICompatBackend(parse_binding("azure:prod-gpt4o")).complete(req()))
    assert resp.message.content == "hi"
    assert seen == [{"deployment": "prod-gpt4o", "version": "2024-10-21", "key": SECRET}]


def test_openai_stream(monkeypatch):
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        from fastapi.responses import StreamingResponse

        def events():
            for i, word in enumerate(["a", "b", None]):
                delta = {"content": word} if word else {}
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None if word else "stop"}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    with serve(app) as url:
        backend = OpenAICompatBackend(parse_binding(f"openai:m?base_url={url}/v1"))

        async def collect():
            return [c async for c in backend.stream(req())]

        chunks = asyncio.run(collect())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ab"
