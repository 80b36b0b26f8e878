"""The proxy on real uvicorn over loopback, driven by the real `openai` and `langchain_openai` clients; scripted
backends force the model's words, a real store keeps what the proxy captured."""

import asyncio
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from app.config import load_settings
from app.server.auth import hash_key
from app.server.routes import create_app
from app.services import Services
from tests.support.http import serve
from tests.support.scripted import tool

KEY = "sk-slmswap-test-key-0123456789"
TOOLS = [{"type": "function", "function": {"name": "run_sql", "description": "Run one SELECT.", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]


def write_config(keys=True, open_routes=False, max_concurrency=64, max_body_bytes=1_000_000, extra=""):
    api_keys = f'api_keys = ["{hash_key(KEY)}"]' if keys else ""
    Path("slmswap.toml").write_text(f'''default_binding = "scripted:teacher"

[routes.support]
teacher = "scripted:teacher"

[proxy]
{api_keys}
open_routes = {str(open_routes).lower()}
max_concurrency = {max_concurrency}
max_body_bytes = {max_body_bytes}
{extra}''')


@pytest.fixture
def proxy(request):
    """(base_url, services) of a proxy started on the config the test wrote (or the default one)."""
    if not Path("slmswap.toml").exists():
        write_config()
    services = Services.from_settings(load_settings())
    with serve(create_app(services.settings, services)) as url:
        yield url, services


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def ask(**kw):
    return {"model": "support", "messages": [{"role": "user", "content": "hello"}], **kw}


# ---- the OpenAI client sees OpenAI ---------------------------------------------------------------------

def test_a_plain_completion_names_who_answered(proxy, scripted):
    url, services = proxy
    scripted("teacher").enqueue("hi there")
    raw = client(url).chat.completions.with_raw_response.create(**ask(user="alice"))
    resp = raw.parse()
    assert resp.choices[0].message.content == "hi there" and resp.model == "support"
    assert resp.usage.total_tokens > 0 and resp.choices[0].finish_reason == "stop"
    assert raw.headers["x-slmswap-binding"] == "scripted:teacher" and raw.headers["x-slmswap-role"] == "teacher"
    call = services.store.get_call(raw.headers["x-slmswap-call-id"])
    assert (call.source, call.route, call.caller) == ("proxy", "support", hash_key(KEY))
    assert "slmswap" not in raw.http_response.json()  # our call info travels in headers, not in OpenAI's body


def test_tools_come_back_as_openai_tool_calls(proxy, scripted):
    url, _ = proxy
    scripted("teacher").enqueue(tool("run_sql", query="SELECT 1"))
    resp = client(url).chat.completions.create(**ask(tools=TOOLS, tool_choice="required"))
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "run_sql" and json.loads(call.function.arguments) == {"query": "SELECT 1"}
    assert resp.choices[0].finish_reason == "tool_calls"


def test_async_streaming_in_openais_exact_shape_with_usage_last(proxy, scripted):
    url, _ = proxy
    scripted("teacher").enqueue("one two three")

    async def collect():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as c:
            stream = await c.chat.completions.create(**ask(stream=True, stream_options={"include_usage": True}))
            return [chunk async for chunk in stream]

    chunks = asyncio.run(collect())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "one two three"
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 3
    assert all(c.usage is None for c in body) and body[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1 and all(c.model == "support" for c in chunks)


def test_streamed_tool_calls_arrive_as_indexed_deltas(proxy, scripted):
    url, _ = proxy
    scripted("teacher").enqueue([tool("run_sql", query="SELECT 1"), tool("run_sql", query="SELECT 2")])
    chunks = list(client(url).chat.completions.create(**ask(tools=TOOLS, stream=True)))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "run_sql"), (1, "run_sql")]
    assert chunks[-1].usage is None  # include_usage was not asked for


def test_langchain_chat_openai_pointed_at_the_proxy(proxy, scripted):
    from langchain_openai import ChatOpenAI

    url, _ = proxy
    scripted("teacher").enqueue("plain answer", tool("run_sql", query="SELECT 3"))
    llm = ChatOpenAI(model="support", base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert llm.invoke("hi").content == "plain answer"
    ai = llm.bind_tools(TOOLS).invoke("query it")
    assert ai.tool_calls[0]["name"] == "run_sql" and ai.tool_calls[0]["args"] == {"query": "SELECT 3"}


def test_models_lists_the_routes(proxy):
    url, _ = proxy
    ids = [m.id for m in client(url).models.list()]
    assert "support" in ids and "retrieval" in ids and "orchestrator" in ids


# ---- errors in OpenAI's body, with the right status ----------------------------------------------------

def post(url, body, key=KEY, headers=None, raw=None):
    h = {"authorization": f"Bearer {key}", **(headers or {})} if key else dict(headers or {})
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json", **h},
                      timeout=30)


@pytest.mark.parametrize("raw, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"model": "support"}).encode(), 400, "missing messages"),
    (json.dumps(ask(messages=[{"role": "robot", "content": "x"}])).encode(), 400, "messages.0.role"),
    (json.dumps(ask(temperature="hot")).encode(), 400, "temperature"),
    (json.dumps(ask(n=3)).encode(), 400, "n=3 is not supported"),
    (json.dumps(ask(tools=TOOLS, tool_choice="sometimes")).encode(), 400, "tool_choice"),
    (json.dumps(ask(model="nope")).encode(), 404, "names no route; the routes are: orchestrator"),
    (b"\xff\xfe", 400, "not valid JSON"),
])
def test_bad_requests_get_openai_error_bodies_never_a_500(proxy, scripted, raw, status, message):
    url, _ = proxy
    resp = post(url, None, raw=raw)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_keys_are_required_and_checked(proxy):
    url, _ = proxy
    assert post(url, ask(), key=None).status_code == 401
    wrong = post(url, ask(), key="sk-slmswap-wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="nope").chat.completions.create(**ask())


def test_a_body_over_the_limit_is_413(scripted):
    write_config(max_body_bytes=2048)
    services = Services.from_settings(load_settings())
    with serve(create_app(services.settings, services)) as url:
        resp = post(url, ask(messages=[{"role": "user", "content": "x" * 5000}]))
    services.close()
    assert resp.status_code == 413 and "max_body_bytes" in resp.json()["error"]["message"]


def test_open_routes_create_a_route_on_first_use(scripted):
    write_config(open_routes=True)
    services = Services.from_settings(load_settings())
    scripted("teacher").enqueue("made up")
    with serve(create_app(services.settings, services)) as url:
        resp = client(url).chat.completions.create(**ask(model="brand-new-route"))
    services.close()
    assert resp.choices[0].message.content == "made up"


def test_a_full_route_answers_429_with_retry_after(scripted):
    write_config(max_concurrency=1)
    services = Services.from_settings(load_settings())
    entered, release = threading.Event(), threading.Event()

    async def hold(req):
        entered.set()
        await asyncio.to_thread(release.wait)
        return "done"

    scripted("teacher").default = hold
    with serve(create_app(services.settings, services)) as url:
        first = threading.Thread(target=post, args=(url, ask()))
        first.start()
        assert entered.wait(30)  # deterministic: the first request holds the route's only slot
        second = post(url, ask())
        release.set()
        first.join()
    services.close()
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "rate_limit_exceeded"


def test_every_binding_failing_is_502_and_a_timeout_504(proxy, scripted):
    from app.errors import BackendError, UpstreamTimeout

    url, services = proxy
    scripted("teacher").enqueue(BackendError("azure:gpt-4o failed (HTTP 503): overloaded"),
                                UpstreamTimeout("azure:gpt-4o timed out after 60 s"))
    bad, slow = post(url, ask()), post(url, ask())
    assert bad.status_code == 502 and "HTTP 503" in bad.json()["error"]["message"]
    assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout"
    assert [c.error_type for c in services.store.list_calls()] == ["timeout", "backend_error"]


def test_unknown_paths_and_methods_are_openai_errors(proxy):
    url, _ = proxy
    missing = httpx.get(f"{url}/v1/nothing")
    assert missing.status_code == 404 and "/v1/chat/completions" in missing.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405


# ---- capture, feedback, metrics ------------------------------------------------------------------------

def test_capture_can_be_turned_off_per_request(proxy, scripted):
    url, services = proxy
    scripted("teacher").default = "ok"
    post(url, ask(), headers={"x-slmswap-capture": "off"})
    post(url, ask(metadata={"capture": "false"}))
    post(url, ask())
    assert len(services.store.list_calls()) == 1


def test_client_metadata_cannot_write_our_capture_fields(proxy, scripted):
    url, services = proxy
    scripted("teacher").default = "ok"
    resp = post(url, ask(metadata={"run_id": "forged", "template_id": "evil@1", "source": "graph"}))
    call = services.store.get_call(resp.headers["x-slmswap-call-id"])
    assert (call.run_id, call.template_id, call.source) == (None, None, "proxy")


def test_feedback_is_stored_against_the_call(proxy, scripted):
    url, services = proxy
    scripted("teacher").default = "ok"
    call_id = post(url, ask()).headers["x-slmswap-call-id"]
    auth = {"authorization": f"Bearer {KEY}"}
    ok = httpx.post(f"{url}/v1/feedback", json={"call_id": call_id, "success": False, "comment": "wrong"}, headers=auth)
    assert ok.status_code == 200 and ok.json()["call_id"] == call_id
    unknown = httpx.post(f"{url}/v1/feedback", json={"call_id": "nope", "score": 1}, headers=auth)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "call_id"
    bad = httpx.post(f"{url}/v1/feedback", json={"call_id": call_id, "score": "great"}, headers=auth)
    assert bad.status_code == 400
    assert httpx.post(f"{url}/v1/feedback", json={"call_id": call_id, "success": True}).status_code == 401


def test_metrics_and_health(proxy, scripted):
    url, _ = proxy
    scripted("teacher").default = "ok"
    post(url, ask())
    assert httpx.get(f"{url}/metrics").status_code == 401  # keys are configured: a scraper sends one too
    text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    assert 'slmswap_requests_total{role="teacher",route="support",status="ok"} 1.0' in text
    assert 'slmswap_stage{route="support"} 0.0' in text and "slmswap_request_latency_seconds_bucket" in text
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


class _Dribble:
    """A backend that streams one word and then waits for ever: only a client leaving ends its call."""

    closed = threading.Event()

    def __init__(self, binding) -> None:
        self.binding = binding

    async def complete(self, req):
        raise NotImplementedError

    async def stream(self, req):
        from app.wire import ChatChunk, ChunkChoice, DeltaMessage

        try:
            yield ChatChunk(id="c1", choices=[ChunkChoice(delta=DeltaMessage(role="assistant", content="first"))])
            await asyncio.Event().wait()
        finally:
            _Dribble.closed.set()


def test_a_client_that_leaves_mid_stream_cancels_the_upstream_and_the_call_is_aborted(scripted):
    from app.backends.base import register_backend
    from app.bindings import BindingOptions, register_kind

    register_kind("dribble", BindingOptions)
    register_backend("dribble", _Dribble, pricing="local")
    Path("slmswap.toml").write_text('[routes.support]\nteacher = "dribble:x"\n')
    services = Services.from_settings(load_settings())
    app = create_app(services.settings, services)
    with serve(app) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=ask(stream=True)) as resp:
            assert resp.headers["x-slmswap-binding"] == "dribble:x"
            assert "first" in next(resp.iter_lines())
        assert _Dribble.closed.wait(30)  # the server closed the backend's stream when the client left
        services.store.flush()
        [call] = services.store.list_calls()
    assert app.state.proxy.in_flight["support"] == 0  # and gave the route's slot back
    services.close()
    assert (call.valid, call.error_type, call.response["content"]) == (False, "aborted", "first")


def test_email_addresses_are_redacted_in_captures_but_the_answer_is_the_models(proxy, scripted):
    url, services = proxy
    scripted("teacher").enqueue("I wrote to bob@example.com")
    resp = post(url, ask(messages=[{"role": "user", "content": "mail alice.smith+x@corp.example.org"}]))
    assert resp.json()["choices"][0]["message"]["content"] == "I wrote to bob@example.com"
    call = services.store.get_call(resp.headers["x-slmswap-call-id"])
    assert call.request["messages"][0]["content"] == "mail [redacted]"
    assert call.response["content"] == "I wrote to [redacted]"


def test_a_field_we_ignore_is_logged_once(proxy, scripted, caplog):
    import logging

    from app.server import protocol

    protocol._IGNORED_SEEN.discard("prediction")
    url, _ = proxy
    scripted("teacher").default = "ok"
    with caplog.at_level(logging.WARNING, logger="slmswap.server"):
        for _ in range(3):
            assert post(url, ask(prediction={"type": "content", "content": "x"})).status_code == 200
    notes = [r.getMessage() for r in caplog.records if "'prediction'" in r.getMessage()]
    assert notes == ["request field 'prediction' is accepted but ignored by slm-swap (logged once)"]


def test_proxy_calls_are_traced_to_langfuse_when_configured(scripted, monkeypatch):
    import uuid

    from app import observability
    from tests.support.langfuse_receiver import LangfuseReceiver, observation_metadata

    with LangfuseReceiver() as receiver:
        monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", f"pk-lf-{uuid.uuid4().hex}")
        monkeypatch.setenv("LANGFUSE_SECRET_KEY", f"sk-lf-{uuid.uuid4().hex}")
        monkeypatch.setenv("LANGFUSE_HOST", receiver.url)
        write_config()
        scripted("teacher").enqueue("traced answer")
        services = Services.from_settings(load_settings())
        try:
            with serve(create_app(services.settings, services)) as url:
                assert post(url, ask()).status_code == 200
        finally:
            observability.shutdown()
        [span] = receiver.wait_for_spans(1)
    meta = observation_metadata(span)
    assert (meta["agent"], meta["binding"], meta["valid"]) == ("support", "scripted:teacher", True)
    assert "traced answer" in json.dumps(span["attributes"])


def test_a_finished_stream_frees_its_routes_slot(scripted):
    write_config(max_concurrency=1)
    services = Services.from_settings(load_settings())
    scripted("teacher").default = "a few words"
    app = create_app(services.settings, services)
    with serve(app) as url:
        for _ in range(3):  # one slot: each stream must give it back for the next to get in
            chunks = list(client(url).chat.completions.create(**ask(stream=True)))
            assert chunks
        assert app.state.proxy.in_flight["support"] == 0
    services.close()
