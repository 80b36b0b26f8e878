"""Template rows (prompts/store.py): creation with content-hash dedupe, variables that cannot clash with JSON,
render, get/retire, and the shipped base files registered as rows — on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import re

import pytest

from app.capture.records import template_hash
from app.capture.store import CaptureStore
from app.errors import UsageError
from prompts import store as ts
from prompts.base import base_templates
from tests.support.cli import slmswap


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
    assert ts.render(text, {"examples": "E", "tools": "T"}) == 'Reply {"a": {"b": [{"c": 1}]}} then E; tools: T.'
    assert ts.render(text) == 'Reply {"a": {"b": [{"c": 1}]}} then ; tools: .'
    with pytest.raises(UsageError, match="shots"):
        ts.render(text, {"shots": "x"})


@pytest.mark.parametrize("agent", sorted(base_templates()))
def test_every_shipped_template_holds_no_variable_and_renders_to_itself(agent):
    text = base_templates()[agent].text
    assert ts.variables(text) == []
    assert ts.render(text, {"examples": "EXAMPLES", "tools": "TOOLS"}) == text
    # Every JSON object the template shows survives rendering intact (the braces are not a variable syntax).
    for blob in re.findall(r"\{\"[^\n]*\}", text):
        json.loads(blob)
        assert blob in ts.render(text, {"examples": "E"})


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
