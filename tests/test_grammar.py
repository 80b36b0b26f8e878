"""Grammars for constrained decoding: tool plans and schemas as plain data, then the compiled grammar driven by
SmolLM2's real tokenizer, and by Qwen2.5-Coder's, whose call tags are special tokens (vocabularies only; no model
weights are evaluated)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.backends import grammar
from app.backends.grammar import (STRING_LIMIT, TEXT_TAGS, TokenMask, ToolTags, answer_schema, call_schema,
                                  compiled_matcher, request_lark, tame, tool_calls_lark)
from app.toolplan import ToolPlan, request_plan
from app.errors import UsageError
from app.wire import ChatRequest
from tests.support.requires import require

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                           "required": ["tz"]}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
USER = [{"role": "user", "content": "hi"}]


def request(**kw) -> ChatRequest:
    return ChatRequest(messages=USER, **kw)


# ---- plain data ----------------------------------------------------------------------------------------

def test_plan_tools_follows_openai_tool_choice():
    assert request_plan(request()).mode == "none"
    assert request_plan(request(tools=TOOLS, tool_choice="none")).mode == "none"
    auto = request_plan(request(tools=TOOLS))
    assert (auto.mode, auto.functions, auto.parallel) == ("auto", [WEATHER, TIME], True)
    assert request_plan(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)) == ToolPlan(
        "required", [WEATHER, TIME], parallel=False, offered=("get_weather", "get_time"))
    named = request_plan(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert (named.mode, named.functions, named.parallel) == ("named", [TIME], False)


def test_plan_tools_errors_name_the_fix():
    with pytest.raises(UsageError, match="not in tools \\(get_weather, get_time\\)"):
        request_plan(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}))
    with pytest.raises(UsageError, match="use 'none', 'auto', 'required'"):
        request_plan(request(tools=TOOLS, tool_choice="sometimes"))


def test_answer_schema_per_response_format():
    assert answer_schema(None) is None
    assert answer_schema({"type": "text"}) is None
    assert answer_schema({"type": "json_object"}) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert answer_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": STRING_LIMIT}},
        "additionalProperties": False}
    with pytest.raises(UsageError, match="json_schema"):
        answer_schema({"type": "yaml"})


def test_tame_bounds_free_strings_only():
    out = tame({"type": "object", "properties": {
        "free": {"type": "string"}, "short": {"type": "string", "maxLength": 5},
        "choice": {"type": "string", "enum": ["a", "b"]}, "code": {"type": "string", "pattern": "^[A-Z]+$"}}})
    props = out["properties"]
    assert props["free"]["maxLength"] == STRING_LIMIT and props["short"]["maxLength"] == 5
    assert "maxLength" not in props["choice"] and "maxLength" not in props["code"]


def test_tame_forbids_invented_keys_but_keeps_free_maps_and_values():
    schema = {"type": "object", "properties": {
        "inner": {"type": "object", "properties": {"x": {"type": "string"}}},
        "items": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "string"}}}},
        "open": {"type": "object", "properties": {"z": {}}, "additionalProperties": True},
        "map": {"type": "object"},
        "fixed": {"const": {"properties": {"p": 1}}}}}
    out = tame(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["inner"]["additionalProperties"] is False
    assert out["properties"]["items"]["items"]["additionalProperties"] is False
    assert out["properties"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in out["properties"]["map"]
    assert out["properties"]["fixed"] == {"const": {"properties": {"p": 1}}}
    assert "additionalProperties" not in schema  # the request's own schema is untouched


def test_tame_bounds_numbers_only_where_the_schema_does_not():
    limit = grammar.NUMBER_LIMIT
    assert tame({"type": "integer"}) == {"type": "integer", "minimum": -limit, "maximum": limit}
    assert tame({"type": "number", "minimum": 0}) == {"type": "number", "minimum": 0, "maximum": limit}
    assert tame({"type": "integer", "exclusiveMaximum": 5}) == {"type": "integer", "exclusiveMaximum": 5,
                                                                "minimum": -limit}
    assert tame({"enum": [1, 2]}) == {"enum": [1, 2]}


def test_call_schema_is_name_const_then_arguments():
    schema = call_schema(WEATHER)
    assert list(schema["properties"]) == ["name", "arguments"]
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"]["required"] == ["city"]
    assert call_schema({"name": "ping"})["properties"]["arguments"] == {
        "type": "object", "properties": {}, "additionalProperties": False}


def test_request_lark_only_when_something_constrains_the_output():
    assert request_lark(request()) is None
    assert request_lark(request(tools=TOOLS, tool_choice="none")) is None
    assert request_lark(request(tools=TOOLS, decoding="free")) is None
    assert request_lark(request(response_format={"type": "json_object"}, decoding="free")) is None
    assert request_lark(request(response_format={"type": "json_object"})).startswith("start: %json")
    required = request_lark(request(tools=TOOLS, tool_choice="required"))
    assert required.startswith("start: calls") and "get_time" in required and "TEXT" not in required
    named = request_lark(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert "get_weather" not in named and 'calls: tool_call "\\n"?\n' in named
    assert "start: answer | calls" in request_lark(request(tools=TOOLS))


def test_tags_are_literals_or_special_token_references():
    plan = ToolPlan("required", [TIME])
    assert 'tool_call: "<tool_call>\\n" fn "\\n</tool_call>"' in tool_calls_lark(plan)  # what SmolLM2 was measured on
    assert tool_calls_lark(plan, tags=TEXT_TAGS) == tool_calls_lark(plan)
    special = tool_calls_lark(plan, tags=ToolTags(open=151657, close=151658))
    assert 'tool_call: <[151657]> "\\n" fn "\\n" <[151658]>' in special and '"<tool_call>' not in special
    half = tool_calls_lark(plan, tags=ToolTags(open=7))
    assert 'tool_call: <[7]> "\\n" fn "\\n</tool_call>"' in half
    assert "<[5]>" in request_lark(request(tools=TOOLS, tool_choice="required"), ToolTags(5, 6))


# ---- compiled against SmolLM2's tokenizer --------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    llama_cpp = require("llama_cpp")
    from llguidance.llamacpp import lltokenizer_from_vocab

    from app.local_models import resolve_model

    llm = llama_cpp.Llama(str(resolve_model("smollm2-135m")), vocab_only=True, verbose=False)
    # The tokenizer calls into llama.cpp's vocabulary: `llm` must outlive it.
    yield lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(llm.model), eos_token=[2])
    del llm


def accepts(tokenizer, lark: str, text: str) -> bool:
    """Whether the grammar takes exactly `text`, fed token by token as the model would produce it."""
    matcher = compiled_matcher(tokenizer, lark)
    return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()


def call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_required_grammar_takes_valid_calls_only(tokenizer):
    lark = tool_calls_lark(ToolPlan("required", [WEATHER, TIME]))
    assert accepts(tokenizer, lark, call("get_weather", {"city": "Paris", "unit": "c"}))
    assert accepts(tokenizer, lark, call("get_time", {"tz": "UTC"}))
    assert accepts(tokenizer, lark, call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {"tz": "UTC"}))
    assert not accepts(tokenizer, lark, call("get_weather", {"city": "Paris", "unit": "kelvin"}))  # enum
    assert not accepts(tokenizer, lark, call("get_weather", {"unit": "c"}))  # required
    assert not accepts(tokenizer, lark, call("get_weather", {"city": "Paris", "extra": 1}))  # closed
    assert not accepts(tokenizer, lark, call("delete_all", {}))
    assert not accepts(tokenizer, lark, "Sure, let me check.")
    assert not accepts(tokenizer, lark, '<tool_call>\n{"name":"get_time","arguments":{"tz":"UTC"}}\n</tool_call>')


def test_parallel_calls_only_when_allowed(tokenizer):
    two = call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {"tz": "UTC"})
    assert accepts(tokenizer, tool_calls_lark(ToolPlan("required", [WEATHER, TIME], parallel=True)), two)
    assert not accepts(tokenizer, tool_calls_lark(ToolPlan("required", [WEATHER, TIME], parallel=False)), two)


def test_one_newline_may_end_the_calls(tokenizer):
    for plan in (ToolPlan("required", [TIME]), ToolPlan("named", [TIME], parallel=False)):
        lark = tool_calls_lark(plan)
        assert accepts(tokenizer, lark, call("get_time", {"tz": "UTC"}) + "\n")
        assert not accepts(tokenizer, lark, call("get_time", {"tz": "UTC"}) + "\n\n")
        assert not accepts(tokenizer, lark, call("get_time", {"tz": "UTC"}) + "\nDone.")


def test_auto_grammar_takes_text_or_calls_never_a_broken_call(tokenizer):
    lark = tool_calls_lark(ToolPlan("auto", [WEATHER]))
    assert accepts(tokenizer, lark, "The weather is fine, no need to check.")
    assert accepts(tokenizer, lark, call("get_weather", {"city": "Oslo"}))
    assert not accepts(tokenizer, lark, '<tool_call>\n{"name": "get_weather"}')
    assert not accepts(tokenizer, lark, 'Let me look. <tool_call>\n{"name": "oops"}\n</tool_call>')


def test_auto_with_response_format_answers_in_json(tokenizer):
    answer = {"type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"]}
    lark = tool_calls_lark(ToolPlan("auto", [WEATHER]), tame(answer))
    assert accepts(tokenizer, lark, '{"reply": "hello"}')
    assert accepts(tokenizer, lark, call("get_weather", {"city": "Oslo"}))
    assert not accepts(tokenizer, lark, "hello")


def test_json_schema_grammar_is_compact_and_conforming(tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
              "required": ["n", "tag"]}
    lark = request_lark(request(response_format={"type": "json_schema", "json_schema": {"schema": schema}}))
    assert accepts(tokenizer, lark, '{"n": 3, "tag": "a"}')
    assert not accepts(tokenizer, lark, '{"n": 3.5, "tag": "a"}')
    assert not accepts(tokenizer, lark, '{"n": 3, "tag": "c"}')
    assert not accepts(tokenizer, lark, '{"n": 10000000000000000000, "tag": "a"}')  # 20 digits: tamed
    assert not accepts(tokenizer, lark, '{\n  "n": 3,\n  "tag": "a"\n}')  # no whitespace padding


def test_grammar_compiled_once_per_tokenizer(tokenizer, monkeypatch):
    compiled = []
    real = grammar._compile
    monkeypatch.setattr(grammar, "_compile", lambda tok, lark: compiled.append(lark) or real(tok, lark))
    lark = tool_calls_lark(ToolPlan("required", [TIME])) + "\n// unique to this test"
    first, second = compiled_matcher(tokenizer, lark), compiled_matcher(tokenizer, lark)
    assert len(compiled) == 1 and first is not second
    assert first.consume_tokens(tokenizer.tokenize_str("<tool_call>"))  # copies do not share state
    assert second.consume_tokens(tokenizer.tokenize_str("<tool_call>"))


def test_bad_schema_is_a_usage_error(tokenizer):
    with pytest.raises(UsageError, match="cannot be turned into a grammar"):
        compiled_matcher(tokenizer, 'start: %json {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}')


def test_token_mask_allows_exactly_the_grammar_continuations(tokenizer):
    mask = TokenMask(compiled_matcher(tokenizer, 'start: "yes" | "no"'), tokenizer.vocab_size)
    logits = np.zeros(tokenizer.vocab_size + 7, dtype=np.float32)  # longer than the vocab, as some GGUFs are
    mask.apply(logits)
    allowed = np.flatnonzero(np.isfinite(logits))
    assert allowed.size > 0 and all(logits[tokenizer.vocab_size:] == -np.inf)
    assert all("yes".startswith(s) or "no".startswith(s) for s in map(tokenizer.decode_str, [[t] for t in allowed]))
    mask.consume(tokenizer.tokenize_str("yes")[0])
    assert mask.forced() == [] or tokenizer.decode_str(mask.forced()) in ("es", "s")


# ---- compiled against Qwen2.5-Coder's tokenizer: <tool_call> is one special token --------------------------

@pytest.fixture(scope="module")
def qwen():
    """(llama.cpp vocab-only model, llguidance tokenizer, its tags) for Qwen2.5-Coder-0.5B."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llguidance.llamacpp import lltokenizer_from_vocab

    from app.backends import llamacpp
    from app.local_models import resolve_model

    llm = llama_cpp.Llama(str(resolve_model("qwen2.5-coder-0.5b")), vocab_only=True, verbose=False)
    tok = lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(llm.model), eos_token=[151645])
    yield llm, tok, llamacpp.tool_tags(llm)
    del tok, llm


def model_tokens(llm, text: str) -> list[int]:
    """The tokens the model itself writes for `text` (tags as their special tokens)."""
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def test_qwen_tags_are_its_special_tokens(qwen):
    llm, _, tags = qwen
    assert tags == ToolTags(open=151657, close=151658)
    assert model_tokens(llm, call("get_time", {"tz": "UTC"}))[0] == 151657


def test_special_tag_grammar_takes_the_models_own_call_tokens(qwen):
    llm, tok, tags = qwen
    lark = tool_calls_lark(ToolPlan("required", [WEATHER, TIME]), tags=tags)
    two = call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {"tz": "UTC"})
    for text in (call("get_time", {"tz": "UTC"}), two):
        matcher = compiled_matcher(tok, lark)
        assert matcher.consume_tokens(model_tokens(llm, text)) and matcher.is_accepting(), matcher.get_error()
    broken = compiled_matcher(tok, lark)
    assert not broken.consume_tokens(model_tokens(llm, call("get_time", {"zone": "UTC"})))
    # the bug this fixes: the literal grammar rejects the one token Qwen writes for "<tool_call>"
    assert not compiled_matcher(tok, tool_calls_lark(ToolPlan("required", [TIME]))).consume_token(151657)


def test_special_tag_grammar_forced_path_stays_on_the_grammar(qwen):
    # With a named tool the whole call prefix is forced; the forced tokens must be ones the grammar accepts
    # (with the tags as text they were 151657..., which the grammar then rejected: the reported failure).
    _, tok, tags = qwen
    mask = TokenMask(compiled_matcher(tok, tool_calls_lark(ToolPlan("named", [TIME], parallel=False), tags=tags)),
                     tok.vocab_size)
    forced = mask.forced()
    assert forced[:2] == [151657, 198]
    for t in forced:
        mask.consume(t)
    assert tok.decode_str(forced).startswith('<tool_call>\n{"name": "get_time", "arguments": {"tz"')


def test_special_tag_auto_grammar_takes_text_or_calls(qwen):
    llm, tok, tags = qwen
    lark = tool_calls_lark(ToolPlan("auto", [WEATHER]), tags=tags)
    for text in ("The weather is fine, no need to check.", call("get_weather", {"city": "Oslo"})):
        matcher = compiled_matcher(tok, lark)
        assert matcher.consume_tokens(model_tokens(llm, text)) and matcher.is_accepting(), text
    assert not compiled_matcher(tok, lark).consume_tokens(model_tokens(llm, 'Look: <tool_call>\n{"name": "oops"}'))
