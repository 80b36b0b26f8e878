"""The loopback Langfuse receiver against the real langfuse 5.2 SDK: what a LangChain/LangGraph run exports,
how its REST calls are answered, what our handler adds to an async graph run, and how 401/503 from the server
behave."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
from typing import Any, TypedDict

import uuid

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langfuse.langchain import CallbackHandler
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from app import observability
from app.config import load_settings
from app.observability import TOOL_TAG
from tests.support.langfuse_receiver import (
    OTLP_PATH,
    LangfuseReceiver,
    decode_otlp,
    langfuse_client,
    observation_metadata,
)

EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


class ScriptedChat(BaseChatModel):
    """Answers "42" with usage and response metadata, like a Router-backed node model would."""

    model_name: str = "route:retrieval"

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        message = AIMessage(
            content="42",
            usage_metadata={"input_tokens": 7, "output_tokens": 2, "total_tokens": 9},
            response_metadata={"slm_swap": {"binding": "gguf:smollm2-135m", "valid": False, "cost_usd": 0.25}},
        )
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": "gguf:smollm2-135m"})


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def run_chain(handler: CallbackHandler) -> str:
    """A root chain 'workflow' that calls the model with per-call metadata, then the tool."""

    def body(question: str) -> str:
        answer = ScriptedChat().invoke(question, config={"metadata": {"agent": "retrieval", "template_id": "t-7"}})
        add.invoke({"a": 1, "b": 2})
        return str(answer.content)

    config = {
        "callbacks": [handler],
        "run_name": "workflow",
        "metadata": {"run_id": "run-1", "langfuse_session_id": "sess-1", "langfuse_tags": ["slm-swap"]},
    }
    return RunnableLambda(body).invoke("what is six times seven?", config=config)


def by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {span["name"]: span for span in spans}


@pytest.fixture
def receiver():
    with LangfuseReceiver() as receiver:
        yield receiver


# --- pure decoding ----------------------------------------------------------------------------------------------


def test_decode_otlp_turns_any_values_into_python():
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    scope_spans.scope.name = "langfuse-sdk"
    span = scope_spans.spans.add(trace_id=bytes(range(16)), span_id=b"\x01" * 8, name="s", start_time_unix_nano=5)
    values = {
        "text": AnyValue(string_value='{"a": 1}'),
        "flag": AnyValue(bool_value=True),
        "n": AnyValue(int_value=3),
        "x": AnyValue(double_value=0.5),
    }
    span.attributes.extend(KeyValue(key=k, value=v) for k, v in values.items())
    span.attributes.add(key="tags").value.array_value.values.add(string_value="t")

    [decoded] = decode_otlp(request.SerializeToString())

    assert decoded["trace_id"] == bytes(range(16)).hex() and decoded["span_id"] == "01" * 8
    assert decoded["parent_span_id"] is None and decoded["scope"] == "langfuse-sdk" and decoded["start_ns"] == 5
    assert decoded["attributes"] == {"text": '{"a": 1}', "flag": True, "n": 3, "x": 0.5, "tags": ["t"]}


def test_receiver_accepts_gzip_protobuf_and_redacts_authorization(receiver):
    import httpx

    request = ExportTraceServiceRequest()
    request.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\x02" * 16, span_id=b"\x03" * 8, name="s")
    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip", "Authorization": "Basic c2s="}

    reply = httpx.post(receiver.url + OTLP_PATH, content=gzip.compress(request.SerializeToString()), headers=headers)

    assert reply.status_code == 200
    assert [span["name"] for span in receiver.wait_for_spans(1)] == ["s"]
    assert receiver.requests[0]["headers"]["Authorization"] == "REDACTED"


# --- the real SDK ------------------------------------------------------------------------------------------------


def test_langchain_run_exports_one_trace_with_generation_and_tool(receiver):
    with langfuse_client(receiver) as client:
        handler = CallbackHandler()
        assert run_chain(handler) == "42"
        client.flush()
        spans = by_name(receiver.wait_for_spans(3))

    assert set(spans) == {"workflow", "ScriptedChat", "add"}
    assert {span["trace_id"] for span in spans.values()} == {handler.last_trace_id}
    root, gen, tool_span = spans["workflow"], spans["ScriptedChat"], spans["add"]
    assert root["parent_span_id"] is None
    assert gen["parent_span_id"] == tool_span["parent_span_id"] == root["span_id"]

    attrs = gen["attributes"]
    assert attrs["langfuse.observation.type"] == "generation"
    assert attrs["langfuse.observation.model.name"] == "gguf:smollm2-135m"  # llm_output wins over ls_model_name
    assert attrs["langfuse.observation.usage_details"] == '{"input": 7, "output": 2, "total": 9}'
    assert "langfuse.observation.cost_details" not in attrs  # the handler never sends cost on success
    assert "slm_swap" not in attrs["langfuse.observation.output"]  # response_metadata is not exported
    meta = observation_metadata(gen)
    assert (meta["agent"], meta["template_id"], meta["run_id"]) == ("retrieval", "t-7", "run-1")
    assert "langfuse_session_id" not in meta

    assert tool_span["attributes"]["langfuse.observation.type"] == "tool"
    assert tool_span["attributes"]["langfuse.observation.output"] == "3"
    assert root["attributes"]["langfuse.observation.type"] == "chain"
    assert root["attributes"]["session.id"] == "sess-1"
    assert root["attributes"]["langfuse.trace.tags"] == ["slm-swap"]
    assert root["attributes"]["langfuse.trace.metadata.run_id"] == '"run-1"'


def test_sdk_sends_only_otlp_with_basic_auth_and_no_startup_calls(receiver):
    with langfuse_client(receiver) as client:
        run_chain(CallbackHandler())
        client.flush()
        receiver.wait_for_spans(3)

    [request] = receiver.requests
    assert (request["method"], request["path"], request["status"]) == ("POST", OTLP_PATH, 200)
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["content-type"] == "application/x-protobuf" and headers["content-encoding"] == "gzip"
    assert headers["authorization"] == "REDACTED" and headers["x-langfuse-public-key"] == "pk-lf-receiver"


class RouterLikeChat(ScriptedChat):
    """Says what a RouterChatModel says: its route and template before the call, the Router's CallInfo after."""

    route: str = "retrieval"
    template_id: str = "retrieval/base@1"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"route": self.route, "template_id": self.template_id}  # as RouterChatModel's

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        info = {"call_id": "c-1", "route": self.route, "binding": "gguf:smollm2-135m", "valid": False,
                "error_type": "unknown_function", "error_detail": "no tool nope", "cost_usd": 0.25}
        result = super()._generate(messages, stop, run_manager, **kwargs)
        result.generations[0].message.response_metadata = {"slmswap": info}
        return result


class State(TypedDict):
    query: str
    answer: str


class FailedTool:
    ok, content = False, "no such table: sales"  # the shape of agents.tools.ToolResult


def build_graph() -> Any:
    from langgraph.graph import END, START, StateGraph

    async def lookup(state: State) -> dict[str, str]:
        answer = await RouterLikeChat().ainvoke(state["query"])
        await RunnableLambda(lambda _: FailedTool()).ainvoke({"query": "SELECT 1"},
                                                             config={"tags": [TOOL_TAG], "run_name": "run_sql"})
        return {"answer": str(answer.content)}

    graph = StateGraph(State)
    graph.add_node("lookup", lookup)
    graph.add_edge(START, "lookup")
    graph.add_edge("lookup", END)
    return graph.compile()


def test_async_langgraph_run_carries_what_our_handler_adds(receiver, monkeypatch):
    for name, value in receiver.env(public_key=f"pk-lf-{uuid.uuid4().hex}").items():
        monkeypatch.setenv(name, value)
    try:
        callbacks = observability.run_callbacks(load_settings(), run_id="run-2")
        asyncio.run(build_graph().ainvoke({"query": "q"}, config={"callbacks": callbacks, "run_name": "workflow"}))
        observability.flush()
        spans = by_name(receiver.wait_for_spans(4))
    finally:
        observability.shutdown()

    assert set(spans) == {"workflow", "lookup", "retrieval", "run_sql"}
    assert {span["trace_id"] for span in spans.values()} == {observability.trace_id("run-2")}
    root = spans["workflow"]["attributes"]
    assert (root["langfuse.observation.input"], root["langfuse.observation.output"]) == ("q", "42")  # not the state
    gen = spans["retrieval"]  # named after the route, not "RouterLikeChat"
    assert gen["parent_span_id"] == spans["run_sql"]["parent_span_id"] == spans["lookup"]["span_id"]
    meta = observation_metadata(gen)
    facts = ("agent", "template_id", "binding", "valid", "error_type", "call_id")
    assert tuple(meta[k] for k in facts) == ("retrieval", "retrieval/base@1", "gguf:smollm2-135m", False,
                                             "unknown_function", "c-1")
    assert "route" not in meta
    attrs = gen["attributes"]
    assert attrs["langfuse.observation.cost_details"] == '{"total": 0.25}'
    assert attrs["langfuse.observation.level"] == "WARNING"
    assert attrs["langfuse.observation.status_message"] == "invalid output (unknown_function): no tool nope"
    tool_attrs = spans["run_sql"]["attributes"]
    assert tool_attrs["langfuse.observation.type"] == "tool" and tool_attrs["langfuse.observation.level"] == "WARNING"
    assert tool_attrs["langfuse.observation.output"] == "no such table: sales"


def test_rest_calls_get_plausible_answers(receiver):
    with langfuse_client(receiver) as client:
        assert client.auth_check()
        client.create_dataset(name="evals/retrieval")
        client.create_dataset_item(dataset_name="evals/retrieval", input={"q": 1}, expected_output={"a": 2})
        assert [item.expected_output for item in client.get_dataset("evals/retrieval").items] == [{"a": 2}]
        client.create_prompt(name="retrieval", prompt="v1 {{x}}", labels=["production"])
        client.create_prompt(name="retrieval", prompt="v2 {{x}}", labels=["candidate"])
        assert client.get_prompt("retrieval").compile(x="!") == "v1 !"
        client.update_prompt(name="retrieval", version=2, new_labels=["production"])
        assert client.get_prompt("retrieval", cache_ttl_seconds=0).version == 2
        client.create_score(name="valid", value=1, trace_id="ab" * 16)
        client.flush()

    assert [score["name"] for score in receiver.rest.scores] == ["valid"]
    assert all(r["headers"].get("Authorization") == "REDACTED" for r in receiver.requests)
    assert all(r["status"] < 300 for r in receiver.requests)


@pytest.mark.parametrize(
    ("status", "attempts", "warnings", "errors"),
    [(401, 1, 0, 1), (503, 6, 5, 1)],  # 503 retries: 6 tries with Retry-After: 0 (3 in 5 s without it)
)
def test_server_failure_is_logged_not_raised(receiver, caplog, status, attempts, warnings, errors):
    receiver.fail_with(status, retry_after=0)
    with langfuse_client(receiver) as client, caplog.at_level(logging.WARNING):
        secret = "sk-lf-receiver"
        assert run_chain(CallbackHandler()) == "42"
        client.flush()
        exporter_logs = [r for r in caplog.records if r.name == EXPORTER_LOGGER]

    assert receiver.spans == []
    assert len(receiver.requests) == attempts
    assert sum(r.levelno == logging.WARNING for r in exporter_logs) == warnings
    assert sum(r.levelno == logging.ERROR for r in exporter_logs) == errors
    basic = base64.b64encode(f"pk-lf-receiver:{secret}".encode()).decode()
    assert not any(secret in r.getMessage() or basic in r.getMessage() for r in caplog.records)


def test_trace_id_can_be_derived_from_our_run_id(receiver):
    with langfuse_client(receiver) as client:
        trace_id = client.create_trace_id(seed="run-1")
        run_chain(CallbackHandler(trace_context={"trace_id": trace_id}))
        client.flush()
        spans = receiver.wait_for_spans(3)

    assert {span["trace_id"] for span in spans} == {trace_id}


def test_without_keys_the_handler_sends_nothing_and_warns_per_client(receiver, monkeypatch, caplog):
    from langfuse._client.resource_manager import LangfuseResourceManager

    LangfuseResourceManager.reset()
    monkeypatch.setenv("LANGFUSE_BASE_URL", receiver.url)
    monkeypatch.delenv("LANGFUSE_PUBLIC_KEY", raising=False)
    monkeypatch.delenv("LANGFUSE_SECRET_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="langfuse"):
        assert run_chain(CallbackHandler()) == "42"
        assert run_chain(CallbackHandler()) == "42"

    assert receiver.requests == []
    assert sum("without public_key" in r.getMessage() for r in caplog.records) == 2
