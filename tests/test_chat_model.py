"""RouterChatModel: LangChain's chat-model interface over the Router (scripted model words, real store)."""

import asyncio

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool as lc_tool
from pydantic import BaseModel

from app.chat_model import RouterChatModel
from app.config import load_settings
from app.routing.context import CallContext
from app.routing.router import Router
from app.wire import ToolCall
from tests.support.scripted import tool


@pytest.fixture
def model(monkeypatch):
    monkeypatch.setenv("SLMSWAP_DEFAULT_BINDING", "scripted:m")
    return RouterChatModel(router=Router(load_settings()), route="retrieval", template_id="retrieval/base@1", run_id="r1")


@lc_tool
def run_sql(query: str) -> str:
    """Run one SELECT."""
    return "ok"


class Answer(BaseModel):
    region: str
    total: int


def test_bind_tools_maps_choices_and_returns_tool_calls(model, scripted):
    scripted("m").enqueue(tool("run_sql", query="SELECT 1"))
    ai = model.bind_tools([run_sql], tool_choice="any", parallel_tool_calls=False).invoke("go")
    req = scripted("m").requests[0]
    assert req.tool_choice == "required" and req.parallel_tool_calls is False
    assert req.tools[0].function.name == "run_sql" and req.metadata is None  # who calls is not in the payload
    assert model.context() == CallContext(route="retrieval", run_id="r1", template_id="retrieval/base@1")
    assert ai.tool_calls[0]["name"] == "run_sql" and ai.tool_calls[0]["args"] == {"query": "SELECT 1"}
    assert ai.response_metadata["slmswap"]["valid"] and ai.usage_metadata["output_tokens"] > 0
    model.bind_tools([run_sql], tool_choice="run_sql").invoke("go")
    assert scripted("m").requests[1].tool_choice == {"type": "function", "function": {"name": "run_sql"}}


def test_unparseable_arguments_become_invalid_tool_calls(model, scripted):
    scripted("m").enqueue(ToolCall(function={"name": "run_sql", "arguments": "{not json"}))
    ai = model.bind_tools([run_sql]).invoke("go")
    assert ai.tool_calls == [] and ai.invalid_tool_calls[0]["name"] == "run_sql"
    assert not ai.response_metadata["slmswap"]["valid"]


def test_structured_output_sends_a_json_schema_and_parses(model, scripted):
    scripted("m").enqueue('{"region": "West", "total": 3}', "not json")
    assert model.with_structured_output(Answer).invoke("go") == Answer(region="West", total=3)
    fmt = scripted("m").requests[0].response_format
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["required"] == ["region", "total"]
    out = model.with_structured_output(Answer, include_raw=True).invoke("go")
    assert out["parsed"] is None and out["parsing_error"] is not None and out["raw"].content == "not json"


def test_history_with_tool_results_goes_out_as_openai_messages(model, scripted):
    history = [SystemMessage("sys"), HumanMessage("q"),
               AIMessage("", tool_calls=[{"name": "run_sql", "args": {"query": "SELECT 1"}, "id": "c1"}]),
               ToolMessage("1 row", tool_call_id="c1")]
    asyncio.run(model.ainvoke(history))
    roles = [(m.role, m.tool_call_id) for m in scripted("m").requests[0].messages]
    assert roles == [("system", None), ("user", None), ("assistant", None), ("tool", "c1")]
    assert scripted("m").requests[0].messages[2].tool_calls[0].function.arguments == '{"query": "SELECT 1"}'


def test_sync_invoke_works_inside_a_running_event_loop(model, scripted):
    scripted("m").default = "fine"

    async def inside():
        return model.invoke("hi")  # e.g. a sync tool called from an async graph

    assert asyncio.run(inside()).content == "fine"
