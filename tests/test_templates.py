"""Template rows (prompts/store.py): creation with content-hash dedupe, variables that cannot clash with JSON,
render, get/retire, and the shipped base files registered as rows — on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import re

import pytest

from app import hermes
from app.backends.chat_format import prompt_format_for
from app.capture.records import template_hash
from app.capture.store import CaptureStore
from app.errors import UsageError
from prompts import store as ts
from prompts.base import base_templates
from tests.support.cli import slmswap


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
           {"type": "function", "function": {"name": "get_time", "description": "Time in a city.", "parameters": {
               "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture
def store(store_url):
    with CaptureStore.open(store_url) as opened:
        yield opened


def test_add_template_dedupes_by_content_on_its_route(store):
    first = ts.add_template(store, "retrieval", "Fetch the data.\n{{examples}}", origin="manual")
    assert (first.route, first.origin, first.status, first.parent_id, first.trials) == (
        "retrieval", "manual", "live", None, 0)
    assert first.id == f"retrieval/manual-{template_hash(first.text)[:10]}"
    again = ts.add_template(store, "retrieval", "  Fetch the data. {{examples}}  ", origin="evolved")
    assert again == first  # same text modulo white space: not added twice, the existing row is returned
    other_route = ts.add_template(store, "processing", first.text)
    assert other_route.id != first.id and other_route.route == "processing"
    child = ts.add_template(store, "retrieval", first.text + "\nNever write markdown fences.",
                            parent=first.id, origin="evolved")
    assert child.parent_id == first.id and child.origin == "evolved"
    assert [t.id for t in ts.live_templates(store, "retrieval")] == [first.id, child.id]
    assert ts.get_template(store, child.id) == child


@pytest.mark.parametrize("text, named", [
    ("Use {{exampels}} here", "exampels"),
    ("Use {{ Tools }} here", "Tools"),
    ("{{examples}} and {{shots}}", "shots"),
])
def test_unknown_variable_is_rejected_naming_it(store, text, named):
    with pytest.raises(UsageError, match=re.escape("{{" + named + "}}")):
        ts.add_template(store, "retrieval", text)
    assert ts.live_templates(store, "retrieval") == []


def test_bad_creations_say_what_to_do(store):
    with pytest.raises(UsageError, match="origin is one of base, evolved, manual, langfuse"):
        ts.add_template(store, "retrieval", "x", origin="guessed")
    with pytest.raises(UsageError, match="empty"):
        ts.add_template(store, "retrieval", "  \n")
    with pytest.raises(UsageError, match="templates list"):
        ts.add_template(store, "retrieval", "x", parent="retrieval/nope")
    with pytest.raises(UsageError, match="templates list"):
        ts.get_template(store, "retrieval/nope")
    with pytest.raises(UsageError, match="templates list"):
        ts.retire(store, "retrieval/nope", "gone")


def test_render_fills_variables_and_leaves_json_braces_alone():
    text = 'Reply {"a": {"b": [{"c": 1}]}} then {{examples}}; tools: {{ tools }}.'
    section = hermes.tools_prompt([t["function"] for t in WEATHER])
    assert ts.render(text, {"examples": "E"}, tools=WEATHER) == f'Reply {{"a": {{"b": [{{"c": 1}}]}}}} then E; tools: {section}.'
    assert ts.render(text) == 'Reply {"a": {"b": [{"c": 1}]}} then ; tools: .'
    with pytest.raises(UsageError, match="shots"):
        ts.render(text, {"shots": "x"})
    with pytest.raises(UsageError, match=r"request's tools.*tools="):  # {{tools}} is never free text
        ts.render(text, {"tools": "- get_weather"})


@pytest.mark.parametrize("agent", sorted(base_templates()))
def test_every_shipped_template_holds_no_variable_and_renders_to_itself(agent):
    text = base_templates()[agent].text
    assert ts.variables(text) == []
    assert ts.render(text, {"examples": "EXAMPLES"}, tools=WEATHER) == text
    # Every JSON object the template shows survives rendering intact (the braces are not a variable syntax).
    for blob in re.findall(r"\{\"[^\n]*\}", text):
        json.loads(blob)
        assert blob in ts.render(text, {"examples": "E"})


# ---- {{tools}}: one rule for the template store, the bench and the local backends (app.hermes.system_with_tools)


def served_prompt(alias: str, system: str, tools: list[dict] | None, tool_choice=None) -> str:
    """The prompt a local backend renders for a request with this system prompt (llamacpp.py and hf.py call
    `PromptFormat.render(req.messages, request_plan(req).functions)`; the format is the GGUF's own)."""
    from app.toolplan import request_plan
    from app.wire import ChatRequest

    req = ChatRequest(model="r", messages=[{"role": "system", "content": system}, {"role": "user", "content": "Oslo?"}],
                      tools=tools, tool_choice=tool_choice)
    return prompt_format_for(alias).render(req.messages, request_plan(req).functions)


def listings(prompt: str) -> int:
    """How many tool sections a prompt holds (Qwen's template and the hand-written one both close theirs so)."""
    return prompt.count("</tools>\n")


@pytest.mark.parametrize("alias", ["smollm2-135m", "qwen2.5-coder-0.5b"])  # hand-written ChatML; the GGUF's jinja
def test_the_tools_variable_places_the_list_once_where_it_stands(alias):
    template = "You answer with tools.\n\n{{ tools }}\n\n## Rules\n- Output only the call."
    prompt = served_prompt(alias, ts.render(template, tools=WEATHER), WEATHER)
    assert listings(prompt) == 1 and prompt.count('"name": "get_time"') == 1
    assert prompt.index("</tools>") < prompt.index("## Rules")  # the rules still come after the list

    # A template without {{tools}}, or one rendered without the request's tools (the graph's prompt node does not
    # know them): the backend lists them once, after the whole system text.
    for system in ("You answer with tools.\n\n## Rules\n- Output only the call.", ts.render(template)):
        prompt = served_prompt(alias, system, WEATHER)
        assert listings(prompt) == 1 and prompt.index("## Rules") < prompt.index("</tools>")


def test_the_tools_variable_lists_what_tool_choice_lets_the_model_call():
    named = {"type": "function", "function": {"name": "get_time"}}
    text = ts.render("Rules.\n{{tools}}", tools=WEATHER, tool_choice=named)
    assert text == "Rules.\n" + hermes.tools_prompt([WEATHER[1]["function"]])  # only the named function
    prompt = served_prompt("smollm2-135m", text, WEATHER, named)
    assert listings(prompt) == 1 and "get_weather" not in prompt  # the backend's list is that one too
    assert ts.render("Rules.\n{{tools}}", tools=WEATHER, tool_choice="none") == "Rules.\n"
    assert listings(served_prompt("smollm2-135m", "Rules.", WEATHER, "none")) == 0
    assert ts.render("Rules.\n{{tools}}", tools=None) == "Rules.\n"


def test_fill_tools_fills_only_the_tools_variable():
    # What the bench calls before it fills {{examples}} its own way.
    text = 'Use {"a": {"b": 1}}.\n{{ tools }}\n{{examples}}'
    section = hermes.tools_section([t["function"] for t in WEATHER])
    assert ts.fill_tools(text, WEATHER) == f'Use {{"a": {{"b": 1}}}}.\n{section}\n{{{{examples}}}}'
    assert ts.render(ts.fill_tools(text, WEATHER), {"examples": "E"}) == ts.render(text, {"examples": "E"}, tools=WEATHER)


def test_json_can_never_hold_the_variable_opener():
    # The reason the syntax is safe: serialising any nesting never puts two opening braces side by side.
    for value in ({"a": {"b": {}}}, [{"a": [{}]}], {"x": [[{"y": {"z": 1}}]]}):
        assert "{{" not in json.dumps(value) and "{{" not in json.dumps(value, separators=(",", ":"))


def test_base_files_become_rows_once_and_are_never_edited(store):
    base = base_templates()["retrieval"]
    row = ts.ensure_base(store, "retrieval")
    assert (row.id, row.origin, row.text, row.status) == (base.id, "base", base.text, "live")
    assert ts.ensure_base(store, "retrieval") == row and len(store.list_templates("retrieval")) == 1
    assert ts.ensure_base(store, "no-such-agent") is None
    with pytest.raises(UsageError, match="never edited in place"):
        ts.add_template(store, "retrieval", base.text + " changed", origin="base", template_id=base.id)
    assert ts.get_template(store, base.id).text == base.text


def test_retire_keeps_the_row_and_its_counts(store):
    row = ts.add_template(store, "retrieval", "Try this.")
    store.count_template_outcome(row.id, success=False)
    retired = ts.retire(store, row.id, "worse than the base")
    assert (retired.status, retired.retired_reason, retired.failures) == ("retired", "worse than the base", 1)
    assert ts.live_templates(store, "retrieval") == []
    assert ts.add_template(store, "retrieval", "Try this.").status == "retired"  # the same text is the same row


# ---- CLI: templates list / show / errors, through the real entry point ---------------------------------------------



@pytest.fixture
def cli_store():
    from pathlib import Path

    Path("slmswap.toml").write_text('[store]\nurl = "sqlite:///capture.db"\n')
    with CaptureStore.open("sqlite:///capture.db") as opened:
        yield opened


def test_list_shows_trials_and_wilson_interval(capsys, cli_store):
    base = ts.ensure_base(cli_store, "retrieval")
    child = ts.add_template(cli_store, "retrieval", base.text + "\nNever use markdown fences.", parent=base.id,
                            origin="evolved")
    for ok in (True,) * 7 + (False,) * 3:
        cli_store.count_template_outcome(child.id, success=ok)
    ts.retire(cli_store, base.id, "a test retired it")
    code, out, _ = slmswap(capsys, "templates", "list", "--route", "retrieval", "--json")
    assert code == 0
    rows = {r["id"]: r for r in json.loads(out)}
    assert (rows[child.id]["trials"], rows[child.id]["origin"], rows[child.id]["parent_id"]) == (10, "evolved", base.id)
    assert (round(rows[child.id]["low"], 3), round(rows[child.id]["high"], 3)) == (0.397, 0.892)  # wilson(7, 10)
    assert (rows[base.id]["status"], rows[base.id]["retired_reason"]) == ("retired", "a test retired it")
    code, out, _ = slmswap(capsys, "templates", "list")
    assert code == 0 and child.id in out and "70.0% [39.7%, 89.2%]" in out and "retired: a test retired it" in out


def test_show_prints_text_and_diff_to_parent(capsys, cli_store):
    base = ts.ensure_base(cli_store, "retrieval")
    child = ts.add_template(cli_store, "retrieval", base.text + "\nNever use markdown fences.", parent=base.id,
                            origin="evolved")
    code, out, _ = slmswap(capsys, "templates", "show", child.id[:20])
    assert code == 0 and f"--- {base.id}" in out and f"+++ {child.id}" in out
    assert "+Never use markdown fences." in out and base.text.splitlines()[0] in out
    code, _, err = slmswap(capsys, "templates", "show", "nope/nothing")
    assert code == 2 and "templates list" in err


def test_errors_shows_the_pattern_table_with_examples(capsys, cli_store):
    from app.capture.records import CallRecord

    base = ts.ensure_base(cli_store, "retrieval")
    fenced = {"content": '```json\n{"name": "run_sql", "arguments": {"query": "SELECT 1"}}\n```',
              "tool_calls": None, "finish_reason": "stop"}
    request = {"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function", "function": {
        "name": "run_sql", "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                          "required": ["query"]}}}], "params": {}}
    for i in range(3):
        cli_store.record(CallRecord(id=f"fenced-call-{i}", route="retrieval", agent="retrieval", binding="gguf:x",
                                    template_id=base.id, request=request, response=fenced, valid=False))
    code, out, _ = slmswap(capsys, "templates", "errors", "--route", "retrieval", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert row["template_id"] == base.id and row["calls"] == 3 and row["patterns"]
    kind, stat = next(iter(row["patterns"].items()))
    assert stat["count"] == 3 and stat["examples"][0] == "fenced-call-0"
    code, out, _ = slmswap(capsys, "templates", "errors", "--since", "1d")
    assert code == 0 and kind in out and "fenced-call-" in out and "3/3" in out
    code, _, err = slmswap(capsys, "templates", "errors", "--since", "last tuesday")
    assert code == 2 and "7d" in err
    code, out, _ = slmswap(capsys, "templates", "errors", "--route", "processing")
    assert code == 0 and "no error patterns" in out


def test_recorded_calls_move_counts_in_the_same_write(store):
    """On SQLite and PostgreSQL: valid and invalid calls count, eval calls, failed backends and unknown ids do not."""
    from app.capture.records import CallRecord, template_outcome

    row = ts.add_template(store, "retrieval", "Counted.")
    ok = {"content": "fine", "tool_calls": None, "finish_reason": "stop"}

    def call(**kw):
        return CallRecord(**{"route": "retrieval", "binding": "gguf:x", "request": {"messages": []}, "response": ok,
                             "template_id": row.id, **kw})

    made = [call(), call(valid=False, error_type="invalid_json"), call(source="proxy"),
            call(role="shadow", agreement=False), call(source="eval"), call(response=None, valid=False),
            call(valid=False, error_type="aborted"), call(template_id="retrieval/unknown")]
    assert [template_outcome(c) for c in made] == [True, False, True, False, None, None, None, True]
    for c in made[:4]:
        store.record(c)
    for c in made[4:]:
        store.record_soon(c)
    store.flush()
    got = store.get_template(row.id)
    assert (got.successes, got.failures) == (2, 2)
    store.add_feedback(made[0].id, score=0.0)  # a score <= 0 is negative: that success becomes a failure
    store.add_feedback(made[1].id, success=False)  # already a failure: nothing moves
    store.add_feedback(made[2].id, success=True)
    got = store.get_template(row.id)
    assert (got.successes, got.failures) == (1, 3)


def test_m006_keeps_old_rows_duplicates_and_inactive_ones(store_url):
    """A store written before m006 (agent/version/active rows, two of them the same text) migrates without loss."""
    from datetime import UTC, datetime

    from sqlalchemy import text as sql

    from app.capture.engine import open_engine
    from app.capture.migrations import migrate

    engine = open_engine(store_url)
    migrate(engine, stop_before="m006_templates")
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    with engine.begin() as conn:
        stamp = created if conn.dialect.name == "postgresql" else created.strftime("%Y-%m-%d %H:%M:%S.%f")
        for tid, version, body, ok, active in (("r/base@1", 1, "Same.", 5, True), ("r/manual@2", 2, "Same.", 1, True),
                                               ("r/old@3", 3, "Off.", 0, False)):
            conn.execute(sql("INSERT INTO templates (id, agent, version, parent_id, origin, text, successes, failures,"
                             " active, created_at) VALUES (:id, 'r', :v, NULL, 'manual', :t, :s, 2, :a, :c)"),
                         {"id": tid, "v": version, "t": body, "s": ok, "a": active, "c": stamp})
    assert migrate(engine)[0] == "m006_templates"
    engine.dispose()
    with CaptureStore.open(store_url) as store:
        rows = {t.id: t for t in store.list_templates("r")}
        assert set(rows) == {"r/base@1", "r/manual@2", "r/old@3"}
        assert (rows["r/base@1"].successes, rows["r/base@1"].failures, rows["r/base@1"].created_at) == (5, 2, created)
        assert rows["r/base@1"].content_hash == template_hash("Same.") != rows["r/manual@2"].content_hash
        assert (rows["r/old@3"].status, rows["r/manual@2"].status) == ("retired", "live")
        assert ts.add_template(store, "r", "Same.").id == "r/base@1"  # the first of the duplicates is the text's row
