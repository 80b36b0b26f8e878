"""The `hf:` backend on the SmolLM2 GGUF (dequantised plain checkpoint) on CPU: the serving prompt format, tools
through the Hermes codec under the llguidance grammar, json_schema output, stop sequences, streaming, usage."""

import asyncio
import json

import pytest

from app.backends import chat_format
from app.backends.hf import HFBackend
from app.bindings import parse_binding
from app.errors import BindingError
from app.wire import ChatRequest
from tests.support.requires import require

require("transformers")
require("llguidance")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.fixture(scope="module")
def backend():
    return HFBackend(parse_binding("hf:smollm2-135m?device=cpu"))


def test_plain_text_with_usage_and_the_llamacpp_prompt_format(backend):
    req = ChatRequest(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
    resp = asyncio.run(backend.complete(req))
    assert resp.message.content.strip()
    assert 0 < resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 5
    assert backend.model().fmt == chat_format.prompt_format_for("smollm2-135m")


def test_a_tool_call_under_the_grammar_parses_into_tool_calls(backend):
    req = ChatRequest(messages=[{"role": "user", "content": "What's the weather in Paris?"}], tools=[WEATHER],
                      tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    resp = asyncio.run(backend.complete(req))
    calls = resp.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
    assert resp.choices[0].finish_reason == "tool_calls"


def test_tool_messages_go_through_the_codec_and_json_schema_output_validates(backend):
    schema = {"type": "object", "properties": {"temp_c": {"type": "integer"}, "city": {"type": "string"}},
              "required": ["temp_c", "city"], "additionalProperties": False}
    req = ChatRequest(messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
    ], response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}, max_tokens=40)
    prompt = backend.model().fmt.render(req.messages, [])
    assert "<tool_response>\n{\"temp_c\": 21}\n</tool_response>" in prompt and '"name": "get_weather"' in prompt
    resp = asyncio.run(backend.complete(req))
    value = json.loads(resp.message.content)
    assert set(value) == {"temp_c", "city"} and isinstance(value["temp_c"], int)


def test_a_stop_sequence_ends_the_reply_before_it(backend):
    base = {"messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas."}], "max_tokens": 40}
    free = asyncio.run(backend.complete(ChatRequest(**base))).message.content
    assert "3" in free, free  # greedy decoding: the same text as below until the stop
    stopped = asyncio.run(backend.complete(ChatRequest(**base, stop=["3"])))
    assert stopped.message.content == free[:free.index("3")]
    assert stopped.choices[0].finish_reason == "stop"


def test_streaming_joins_to_the_complete_reply(backend):
    req = ChatRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=10)
    whole = asyncio.run(backend.complete(req))

    async def collect():
        return [c async for c in backend.stream(req)]

    chunks = asyncio.run(collect())
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].usage == whole.usage and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_missing_target_says_what_to_give():
    backend = HFBackend(parse_binding("hf:/nonexistent/model"))
    with pytest.raises(BindingError, match="not a model alias, a .gguf file or a model directory"):
        asyncio.run(backend.complete(ChatRequest(messages=[{"role": "user", "content": "hi"}])))
