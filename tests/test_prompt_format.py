"""One prompt format for serving and training: which format each built-in model uses, and training text equal to
the llama.cpp serving prompt plus the completion, token for token, on llama.cpp's and the HF tokenizer."""

import json

import pytest

from app.backends import chat_format, llamacpp
from app.backends.chat_format import PromptFormat, prompt_format_for, training_ids, training_text
from app.bindings import parse_binding
from app.capture.records import CallRecord
from app.capture.store import CaptureStore
from app.wire import ChatRequest
from tests.support.requires import require

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
MESSAGES = [
    {"role": "system", "content": "You answer with tools."},
    {"role": "user", "content": "Weather in Paris, then in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
    {"role": "user", "content": "And Oslo?"},
]
ANSWER = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}


def test_each_built_in_model_gets_its_format():
    smol, qwen, gemma = (prompt_format_for(a) for a in ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"))
    assert smol.kind == "chatml" and smol.template is None  # its GGUF template has no tools section
    assert qwen.kind == "template" and "tools" in qwen.template and qwen.end_of_turn == "<|im_end|>"
    assert gemma.kind == "gemma" and gemma.end_of_turn == "<end_of_turn>"  # its GGUF has no template at all
    assert prompt_format_for("gguf:qwen2.5-coder-0.5b") == qwen


def test_the_qwen_template_renders_tools_calls_and_results_in_the_hermes_format():
    qwen = prompt_format_for("qwen2.5-coder-0.5b")
    prompt = qwen.render(MESSAGES, [TOOLS[0]["function"]])
    assert prompt.startswith("<|im_start|>system\nYou answer with tools.\n\n# Tools\n")
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp_c\": 21}\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # no system message and no tools: the template's own default system prompt, unlike SmolLM2's
    plain = qwen.render([{"role": "user", "content": "hi"}], [])
    assert plain.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    # what the model writes back parses with the one Hermes codec
    _, completion = training_text(qwen, MESSAGES, TOOLS, ANSWER)
    content, calls = chat_format.parse_tool_calls(completion.removesuffix(qwen.end_of_turn))
    assert content is None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}


def test_a_template_without_a_tools_section_falls_back_to_the_hand_written_family():
    meta = {"general.architecture": "llama", "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    assert chat_format.prompt_format_of(meta) == PromptFormat("chatml", "<|im_end|>")
    assert chat_format.prompt_format_of({"general.architecture": "gemma3"}).kind == "gemma"


def _captured_call(tmp_path) -> CallRecord:
    store = CaptureStore.open(f"sqlite:///{tmp_path / 'calls.db'}")
    call = CallRecord(route="weather", binding="openai:gpt-4o-mini", request={"messages": MESSAGES, "tools": TOOLS},
                      response={"content": None, "tool_calls": ANSWER["tool_calls"], "finish_reason": "tool_calls"})
    store.record(call)
    stored = store.get_call(call.id)
    store.close()
    return stored


@pytest.mark.parametrize("alias", ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"])
def test_training_text_is_the_serving_prompt_plus_the_completion_token_for_token(alias, tmp_path):
    require("llama_cpp")
    require("transformers")
    from app.backends import hf_load

    call = _captured_call(tmp_path)
    answer = {"role": "assistant", **{k: call.response[k] for k in ("content", "tool_calls")}}
    fmt = prompt_format_for(alias)
    prompt, completion = training_text(fmt, call.request["messages"], call.request["tools"], answer)

    # the llama.cpp backend renders this very prompt for the same request
    backend = llamacpp.LlamaCppBackend(parse_binding(f"gguf:{alias}"))
    model = backend.model()
    req = ChatRequest.model_validate(call.request)
    served = model.prompt_format.render(req.messages, llamacpp.request_plan(req).functions)
    assert served == prompt and model.prompt_format == fmt

    # llama.cpp tokens: the serving prompt as generate() tokenizes it, then what the model emits for the answer
    llm = model.llm
    serve_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    emitted = llm.tokenize(completion.encode(), add_bos=False, special=True)
    assert emitted[-1] in model.eog  # the completion ends on the token that stops generation
    assert llm.detokenize(emitted, special=True).decode() == completion

    tokenizer = hf_load.load_base(alias, device="cpu")[1]
    ids, mask = training_ids(tokenizer, prompt, completion)
    assert ids == serve_ids + emitted
    assert mask == [0] * len(serve_ids) + [1] * len(emitted)
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == completion
