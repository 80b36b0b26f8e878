"""The one Hermes codec: what the backends render and parse, validation reads and datasets write agree."""

import json

import pytest

from app import hermes
from app.backends.chat_format import parse_tool_calls, render_prompt
from app.validation import parse_calls
from app.wire import AssistantMessage, Message, ToolCall
from training.evaluate import raw_output


def test_a_written_call_reads_back_as_itself():
    text = hermes.assistant_text("Let me check.", [("f", '{"x": 1}'), ("g", {"y": [1, 2]})])
    assert text == ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "g", "arguments": {"y": [1, 2]}}\n</tool_call>')
    content, calls = hermes.split_output(text)
    assert content == "Let me check." and calls == [hermes.ParsedCall("f", {"x": 1}), hermes.ParsedCall("g", {"y": [1, 2]})]


@pytest.mark.parametrize("text, calls", [
    ('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>', [("f", {"x": 1})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', [("f", {"x": 1})]),
    ('<tool_call>[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]</tool_call>', [("f", {}), ("g", {})]),
    ('<tool_call name="f">{"x": 1}</tool_call>', [("f", {"x": 1})]),
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}', [("f", {"x": 1})]),  # a stop sequence ate the close
    ("just text", []),
    ('<tool_call name="f"/>', []),
    ('<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>', []),
    ("```json\n{\"name\": \"f\", \"arguments\": {}}\n```", []),
])
def test_backend_and_validation_read_text_calls_the_same_way(text, calls):
    """A text the backend turns into tool_calls is exactly a text validation reads as calls without error."""
    _, tool_calls = parse_tool_calls(text)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls] == calls
    verdict = parse_calls(content=text, tool_calls=None)
    assert [(c.name, c.arguments) for c in verdict.calls if verdict.valid] == calls


def test_format_errors_carry_a_taxonomy_type():
    with pytest.raises(hermes.FormatError) as caught:
        hermes.read_calls("<tool_call/>")
    assert caught.value.error_type == "self_closing_tag"
    with pytest.raises(hermes.FormatError) as caught:
        hermes.read_calls("<tool_call>\n</tool_call>")
    assert caught.value.error_type == "invalid_json"


def test_the_prompt_an_assistant_turn_renders_is_what_datasets_and_reports_write():
    call = ToolCall(function={"name": "run_sql", "arguments": '{"query": "SELECT 1"}'})
    prompt = render_prompt([Message(role="user", content="q"), Message(role="assistant", content="ok", tool_calls=[call]),
                            Message(role="tool", tool_call_id=call.id, content="[1]")], [], "chatml")
    turn = hermes.assistant_text("ok", [("run_sql", '{"query": "SELECT 1"}')])
    assert f"<|im_start|>assistant\n{turn}<|im_end|>" in prompt
    assert f"<|im_start|>user\n{hermes.tool_response('[1]')}<|im_end|>" in prompt
    assert raw_output(AssistantMessage(content="ok", tool_calls=[call])) == turn
