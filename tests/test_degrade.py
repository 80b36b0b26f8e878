"""Upstreams that speak only part of the protocol: the pure degrading functions, and the backend learning and
degrading against an upstream on loopback that refuses as llama-cpp-python's server does."""

import asyncio
import json
import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.backends.degrade import Capabilities, corrective, degrade, unsupported, verdict
from app.backends.openai_compat import OpenAICompatBackend
from app.bindings import parse_binding
from app.errors import BackendError
from app.wire import ChatRequest, ChatResponse
from tests.support.http import serve

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": SCHEMA}} for n in ("weather", "news")]
PLAN = {"type": "object", "properties": {"steps": {"type": "integer"}}, "required": ["steps"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN, "strict": True}}
# llama-cpp-python's server, word for word: pydantic's literal error, and a bare `assert tool_choice == "auto"`.
LLAMACPP_JSON_SCHEMA = ("1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                        "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}")
NEWS = {"type": "function", "function": {"name": "news"}}
NOTHING = Capabilities(json_schema=False, tool_required=False, tool_named=False, parallel_tool_calls=False)


def req(**kw):
    return ChatRequest(model="route", messages=[{"role": "system", "content": "You help."},
                                                {"role": "user", "content": "Weather in Paris?"}], **kw)


def system_of(r: ChatRequest) -> str:
    return r.messages[0].text()


# ---- pure functions ------------------------------------------------------------------------------------

def test_nothing_lacking_leaves_the_request_as_it_is():
    original = req(tools=TOOLS, tool_choice="required", response_format=JSON_SCHEMA)
    assert degrade(original, Capabilities()).upstream is original
    assert not degrade(original, Capabilities(tool_named=False)).degraded  # named is not what it asks for


def test_required_becomes_auto_with_a_note_naming_the_functions():
    out = degrade(req(tools=TOOLS, tool_choice="required"), NOTHING)
    assert out.upstream.tool_choice == "auto" and out.changes == ("tool_choice required → auto",)
    assert system_of(out.upstream).startswith("You help.") and "weather, news" in system_of(out.upstream)


def test_required_over_one_function_is_that_function_named_where_named_works():
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "news"}}]}}
    out = degrade(req(tools=TOOLS, tool_choice=allowed), Capabilities(tool_required=False))
    assert out.upstream.tool_choice == {"type": "function", "function": {"name": "news"}}
    assert [t.function.name for t in out.upstream.tools] == ["news"]


def test_named_becomes_auto_over_that_function_alone():
    out = degrade(req(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "news"}}), NOTHING)
    assert out.upstream.tool_choice == "auto" and [t.function.name for t in out.upstream.tools] == ["news"]
    assert "function news" in system_of(out.upstream) and out.single_call


def test_json_schema_becomes_json_object_with_the_schema_in_the_system_prompt():
    out = degrade(req(response_format=JSON_SCHEMA), Capabilities(json_schema=False))
    assert out.upstream.response_format == {"type": "json_object", "schema": PLAN}
    assert json.dumps(PLAN, sort_keys=True) in system_of(out.upstream)
    no_system = ChatRequest(messages=[{"role": "user", "content": "plan"}], response_format=JSON_SCHEMA)
    first = degrade(no_system, Capabilities(json_schema=False)).upstream.messages[0]
    assert first.role == "system" and "JSON Schema" in first.text()


@pytest.mark.parametrize("status, message, kw, gap", [
    (500, LLAMACPP_JSON_SCHEMA, {"response_format": JSON_SCHEMA}, "json_schema"),
    (400, "response_format.type json_schema is not supported", {"response_format": JSON_SCHEMA}, "json_schema"),
    (500, "", {"tools": TOOLS, "tool_choice": "required"}, "tool_required"),
    (422, "tool_choice must be 'auto'", {"tools": TOOLS, "tool_choice": NEWS}, "tool_named"),
    (500, "", {"tools": TOOLS, "tool_choice": "auto"}, None),  # an empty 500 is no refusal of auto
    (500, "out of memory", {"tools": TOOLS, "tool_choice": "required"}, None),
    (404, "tool_choice", {"tools": TOOLS, "tool_choice": "required"}, None),
    (500, LLAMACPP_JSON_SCHEMA, {}, None),  # the request did not ask for json_schema
])
def test_an_error_names_the_capability_the_upstream_lacks(status, message, kw, gap):
    assert unsupported(req(**kw), status, message) == gap


def test_corrective_retry_feeds_the_error_back_and_forces_the_function_the_reply_named():
    original = req(tools=TOOLS, tool_choice="required")
    reply = ChatResponse(choices=[{"message": {"content": "I would use news for that."}}])
    judged = verdict(original, reply)
    assert not judged.valid
    retry = corrective(original, reply, judged, Capabilities(tool_required=False))
    assert retry.tool_choice == {"type": "function", "function": {"name": "news"}}
    assert retry.messages[-2].text() == "I would use news for that."
    assert judged.error_type in retry.messages[-1].text() and retry.messages[-1].role == "user"
    assert corrective(original, reply, judged, NOTHING).tool_choice == "required"  # named refused: auto again


def test_binding_options_declare_capabilities():
    opts = parse_binding("openai:m?supports_tool_choice=named&supports_json_schema=false").options
    assert Capabilities.of(opts) == Capabilities(json_schema=False, tool_required=False, tool_named=True)
    azure = parse_binding("azure:d?supports_parallel_tool_calls=false").options
    assert Capabilities.of(azure).parallel_tool_calls is False
    assert Capabilities.of(parse_binding("openai:m").options) == Capabilities()


# ---- the backend, against an upstream that refuses as llama-cpp-python's server does --------------------

class Upstream:
    """Refuses json_schema and any tool_choice but auto/none the way llama-cpp-python does; otherwise answers
    with the next queued message."""

    def __init__(self, *replies):
        self.replies, self.seen = list(replies), []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    async def chat(self, request: Request):
        body = await request.json()
        self.seen.append(body)
        if (body.get("response_format") or {}).get("type") == "json_schema":
            return JSONResponse({"error": {"message": LLAMACPP_JSON_SCHEMA}}, status_code=500)
        if body.get("tools") and body.get("tool_choice", "auto") not in ("auto", "none"):
            if body["tool_choice"] == "required" or self.named_refused:
                return JSONResponse({"error": {"message": "", "type": "internal_server_error"}}, status_code=500)
        message = self.replies.pop(0) if self.replies else {"content": "ok"}
        return {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}

    named_refused = False


def call(name, **args):
    return {"tool_calls": [{"id": f"call_{name}", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args)}}]}


def run_backend(upstream, binding_options, *requests, stream=False):
    with serve(upstream.app) as url:
        backend = OpenAICompatBackend(parse_binding(f"openai:m?base_url={url}/v1&max_retries=0{binding_options}"))

        async def go():
            if stream:
                return [[c async for c in backend.stream(r)] for r in requests]
            return [await backend.complete(r) for r in requests]

        return backend, asyncio.run(go())


def test_a_refusal_is_learned_once_and_later_calls_go_degraded_straight_away(caplog):
    caplog.set_level(logging.WARNING, logger="app.backends.openai_compat")
    upstream = Upstream(call("weather", city="Paris"), call("news", city="Rome"))
    r = req(tools=TOOLS, tool_choice="required")
    backend, (first, second) = run_backend(upstream, "", r, r)
    assert [b.get("tool_choice") for b in upstream.seen] == ["required", "auto", "auto"]
    assert first.message.tool_calls[0].function.name == "weather" and verdict(r, second).valid
    assert backend.capabilities.tool_required is False
    learned = [m.getMessage() for m in caplog.records]
    assert len(learned) == 1 and "tool_choice 'required'" in learned[0]


def test_required_over_one_function_goes_named_then_auto_when_named_is_refused_too():
    upstream = Upstream(call("news", city="Rome"))
    upstream.named_refused = True
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "news"}}]}}
    r = req(tools=TOOLS, tool_choice=allowed)
    backend, (resp,) = run_backend(upstream, "", r)
    assert [b.get("tool_choice") for b in upstream.seen][1:] == [{"type": "function", "function": {"name": "news"}},
                                                                 "auto"]
    assert backend.capabilities == Capabilities(tool_required=False, tool_named=False, parallel_tool_calls=None)
    assert verdict(r, resp).valid and [t["function"]["name"] for t in upstream.seen[-1]["tools"]] == ["news"]


def test_an_invalid_degraded_reply_gets_one_corrective_retry():
    # llama-cpp-python under tool_choice auto often answers with an empty message: the retry forces a call by name.
    upstream = Upstream({"content": ""}, call("weather", city="Paris"))
    r = req(tools=TOOLS, tool_choice="required")
    _, (resp,) = run_backend(upstream, "&supports_tool_choice=named", r)
    assert [b.get("tool_choice") for b in upstream.seen] == ["auto", {"type": "function",
                                                                      "function": {"name": "weather"}}]
    assert "empty_output" in upstream.seen[1]["messages"][-1]["content"] and verdict(r, resp).valid


def test_only_one_corrective_retry():
    upstream = Upstream({"content": ""}, {"content": "still text"}, call("weather", city="x"))
    r = req(tools=TOOLS, tool_choice="required")
    _, (resp,) = run_backend(upstream, "&supports_tool_choice=", r)
    assert len(upstream.seen) == 2 and resp.message.content == "still text"  # the Router judges it invalid


def test_json_schema_degrades_to_json_object_and_a_reply_off_schema_is_corrected():
    upstream = Upstream({"content": '{"steps": "two"}'}, {"content": '{"steps": 2}'})
    r = req(response_format=JSON_SCHEMA)
    backend, (resp,) = run_backend(upstream, "", r)
    assert [b["response_format"]["type"] for b in upstream.seen] == ["json_schema", "json_object", "json_object"]
    assert json.loads(resp.message.content) == {"steps": 2} and backend.capabilities.json_schema is False
    assert "JSON Schema" in upstream.seen[1]["messages"][0]["content"]


def test_a_declared_capability_is_neither_probed_nor_learned():
    upstream = Upstream({"content": '{"steps": 2}'})
    _, (resp,) = run_backend(upstream, "&supports_json_schema=false", req(response_format=JSON_SCHEMA))
    assert [b["response_format"]["type"] for b in upstream.seen] == ["json_object"]
    with pytest.raises(BackendError, match="HTTP 500"):
        run_backend(Upstream(), "&supports_json_schema=true", req(response_format=JSON_SCHEMA))


def test_parallel_calls_an_upstream_ignored_false_for_are_cut_to_the_first():
    both = {"tool_calls": call("weather", city="a")["tool_calls"] + call("news", city="b")["tool_calls"]}
    r = req(tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
    backend, (resp,) = run_backend(Upstream(both), "", r)
    assert [c.function.name for c in resp.message.tool_calls] == ["weather"] and verdict(r, resp).valid
    assert backend.capabilities.parallel_tool_calls is False


def test_a_degraded_stream_is_answered_whole_once_checked():
    upstream = Upstream(call("weather", city="Paris"))
    _, (chunks,) = run_backend(upstream, "", req(tools=TOOLS, tool_choice="required"), stream=True)
    assert [b.get("tool_choice") for b in upstream.seen] == ["required", "auto"]
    (chunk,) = chunks
    assert chunk.choices[0].delta.tool_calls[0]["function"]["name"] == "weather"


def test_an_assistant_turn_that_only_called_tools_is_sent_with_empty_content():
    # llama-cpp-python's server rejects `content: null` and its template fails when content is absent.
    upstream = Upstream()
    history = ChatRequest(messages=[{"role": "user", "content": "go"},
                                    {"role": "assistant", "tool_calls": call("weather", city="a")["tool_calls"]},
                                    {"role": "tool", "tool_call_id": "call_weather", "content": "sunny"}])
    run_backend(upstream, "", history)
    assert upstream.seen[0]["messages"][1]["content"] == ""
