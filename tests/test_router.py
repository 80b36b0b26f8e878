"""The Router over a real SQLite store, with a scripted backend forcing the model's words."""

import asyncio
import json

import pytest

from app.capture.store import CaptureStore
from app.config import load_settings
from app.errors import BackendError
from app.routing.context import CallContext
from app.routing.router import Router
from app.wire import ChatRequest
from tests.support.scripted import tool

TOOLS = [{"type": "function", "function": {"name": "run_sql", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"], "additionalProperties": False}}}]


@pytest.fixture
def router(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSWAP_DEFAULT_BINDING", "scripted:r")
    store = CaptureStore.open(f"sqlite:///{tmp_path}/calls.db")
    yield Router(load_settings(), store)
    store.close()


CTX = CallContext(route="retrieval", run_id="run1", template_id="retrieval/base@1")


def request(**kw) -> ChatRequest:
    base = {"model": "retrieval", "messages": [{"role": "user", "content": "hi"}]}
    return ChatRequest(**{**base, **kw})


async def after(seconds, reply):
    await asyncio.sleep(seconds)
    return reply


def test_complete_captures_one_row_with_route_binding_template_and_run(router, scripted):
    scripted("r").enqueue(after(0.02, "hello there"))  # a sleep lasts at least as long as asked
    resp = asyncio.run(router.complete(request(), CTX))
    assert resp.message.content == "hello there" and resp.model == "scripted:r"
    info = resp.slmswap
    assert info.valid and info.route == "retrieval" and info.template_id == "retrieval/base@1"
    [row] = router.store.list_calls(run_id="run1")
    assert (row.id, row.agent, row.binding, row.template_id, row.valid) == (info.call_id, "retrieval", "scripted:r", "retrieval/base@1", True)
    assert row.request["messages"][0]["content"] == "hi" and row.response["content"] == "hello there"
    assert row.completion_tokens == 2 and row.source == "graph"
    assert row.latency_ms == info.latency_ms >= 20  # the backend's time is counted


def test_who_is_calling_comes_from_the_context_never_from_client_metadata(router, scripted):
    scripted("r").enqueue("hi")
    meta = {"run_id": "forged", "template_id": "evil@1", "source": "eval", "agent": "orchestrator"}
    resp = asyncio.run(router.complete(request(metadata=meta)))
    [row] = router.store.list_calls()
    assert (row.run_id, row.template_id, row.source, row.agent) == (None, None, "graph", "retrieval")
    assert resp.slmswap.template_id is None
    assert scripted("r").requests[0].metadata == meta  # the client's metadata is still the client's


def test_a_context_can_opt_a_call_out_of_capture(router, scripted):
    scripted("r").enqueue("hi")
    asyncio.run(router.complete(request(), CTX.but(capture=False)))
    assert router.store.list_calls() == []


def test_invalid_tool_call_is_labelled_and_captured(router, scripted):
    scripted("r").enqueue(tool("run_sqlx", query="SELECT 1"), tool("run_sql", sql="SELECT 1"), tool("run_sql", query="SELECT 1"))
    verdicts = [asyncio.run(router.complete(request(tools=TOOLS, tool_choice="required"))).slmswap for _ in range(3)]
    assert [v.error_type for v in verdicts] == ["unknown_function", "unknown_parameter", None]
    assert "run_sql" in verdicts[0].error_detail
    stored = {c.id: c for c in router.store.list_calls()}
    assert [stored[v.call_id].valid for v in verdicts] == [False, False, True]


def test_json_response_format_checked(router, scripted):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}
    scripted("r").enqueue('{"n": 3}', '```json\n{"n": 3}\n```', '{"n": "three"}')
    types = [asyncio.run(router.complete(request(response_format=fmt))).slmswap.error_type for _ in range(3)]
    assert types == [None, "markdown_fence", "type_mismatch"]


def test_backend_failure_is_captured_then_raised_as_our_error(router, scripted):
    scripted("r").enqueue(RuntimeError("engine on fire"))
    with pytest.raises(BackendError, match="scripted:r failed: RuntimeError: engine on fire"):
        asyncio.run(router.complete(request()))
    [row] = router.store.list_calls()
    assert not row.valid and row.error_type == "backend_error" and "engine on fire" in row.error_detail


def test_stream_yields_chunks_and_captures_the_whole_message(router, scripted):
    scripted("r").enqueue("one two three")

    async def collect():
        return [c async for c in router.stream(request())]

    chunks = asyncio.run(collect())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["one", "two", "three"]
    assert chunks[-1].slmswap.valid
    [row] = router.store.list_calls()
    assert row.response["content"].split() == ["one", "two", "three"] and row.id == chunks[-1].slmswap.call_id


def test_cost_and_teacher_cost_recorded(tmp_path, monkeypatch, scripted):
    from pathlib import Path

    Path("slmswap.toml").write_text('[routes.fmt]\nteacher = "scripted:r?price_in=1&price_out=2"\n')
    store = CaptureStore.open(f"sqlite:///{tmp_path}/c.db")
    router = Router(load_settings(), store)
    scripted("r").enqueue("a b c d")
    resp = asyncio.run(router.complete(request(model="fmt")))
    [row] = store.list_calls()
    assert row.cost_usd == pytest.approx((10 * 1 + 4 * 2) / 1e6) == resp.slmswap.cost_usd
    assert row.teacher_cost_usd == row.cost_usd
    store.close()


def test_secrets_in_a_request_never_reach_the_store(router, scripted):
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"
    req = request(api_key=secret, messages=[{"role": "user", "content": f"my key is {secret}"}])
    asyncio.run(router.complete(req))
    [row] = router.store.list_calls()
    assert secret not in repr(row.request) and secret not in repr(row.response)


def test_concurrent_calls_all_captured(router, scripted):
    scripted("r").default = lambda req: req.messages[0].content

    async def many():
        return await asyncio.gather(*(router.complete(request(messages=[{"role": "user", "content": f"m{i}"}]))
                                      for i in range(50)))

    answers = [r.message.content for r in asyncio.run(many())]
    assert sorted(answers) == sorted(f"m{i}" for i in range(50))
    assert len(router.store.list_calls(limit=100)) == 50


def test_a_stream_the_client_abandons_is_captured_as_aborted_with_what_it_had(router, scripted):
    scripted("r").enqueue("one two three four")

    async def first_two_then_leave():
        stream = router.stream(request(), CTX)
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()  # what a client disconnecting mid-stream does to the generator
        return got

    asyncio.run(first_two_then_leave())
    router.store.flush()  # an aborted call is queued for the next commit, not waited for
    [row] = router.store.list_calls()
    assert (row.valid, row.error_type, row.run_id) == (False, "aborted", "run1")
    assert row.response["content"] == "one "  # the part it had streamed


def test_a_route_with_repair_on_answers_the_repaired_output_and_keeps_the_raw_one(tmp_path, monkeypatch, scripted):
    from pathlib import Path

    Path("slmswap.toml").write_text('[routes.fmt]\nteacher = "scripted:r"\nrepair = true\n')
    store = CaptureStore.open(f"sqlite:///{tmp_path}/repair.db")
    router = Router(load_settings(), store)
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}
    scripted("r").enqueue('```json\n{"n": "3"}\n```')
    resp = asyncio.run(router.complete(request(model="fmt", response_format=schema), CallContext(route="fmt")))
    [row] = store.list_calls()
    store.close()
    assert json.loads(resp.message.content) == {"n": 3} and resp.slmswap.valid
    assert row.valid and row.response["raw"]["content"] == '```json\n{"n": "3"}\n```'
    assert row.response["repairs"] == ["strip_fence", "coerce"]
