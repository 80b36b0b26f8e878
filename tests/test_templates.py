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
