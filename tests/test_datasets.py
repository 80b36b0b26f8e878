"""Dataset building: which captured calls become rows (and why the rest do not), the split, the Hermes and OpenAI
rows, DPO pairs, BFCL ground truth, and `slmswap dataset` through the real CLI entry point on a real SQLite store."""

from __future__ import annotations

import itertools
import json
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer

from app import cli, hermes
from app.backends import chat_format
from app.capture.records import CallRecord
from app.capture.store import CaptureStore
from app.cli_dataset import dataset_app
from app.errors import UsageError
from app.wire import Message
from training import datasets as ds
from training.bfcl import load_category, reference_calls
from training.suites import is_held_out

STORE = "sqlite:///.slmswap/slmswap.db"  # the default store.url, under the test's own cwd
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the catalogue.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                                          "required": ["q"]}}}]
T0 = datetime(2026, 12, 1, tzinfo=UTC)
_ids = (f"{n:032x}" for n in itertools.count(1))


def fresh_id(held_out: bool = False) -> str:
    """The next id on the wanted side of `is_held_out` (deterministic: a fixed sequence)."""
    return next(i for i in _ids if is_held_out(i) == held_out)


def request(question: str, extra: list[dict] | None = None) -> dict:
    return {"messages": [{"role": "system", "content": "You find products."}, {"role": "user", "content": question},
                         *(extra or [])], "tools": TOOLS, "tool_choice": "auto", "response_format": None,
            "params": {}}


def answer(q: str) -> dict:
    return {"content": None, "finish_reason": "tool_calls",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "search",
                                                                         "arguments": json.dumps({"q": q})}}]}


BAD = {"content": "I would call search(q=shoes)", "tool_calls": None, "finish_reason": "stop"}


def make(name: str, question: str, n: int, *, held_out: bool = False, extra=None, **kw) -> CallRecord:
    fields = dict(route="retrieval", binding="gguf:smollm2-135m", request=request(question, extra),
                  response=answer(question), id=fresh_id(held_out), created_at=T0 + timedelta(minutes=n))
    return CallRecord(**{**fields, **kw})


def seed() -> dict[str, CallRecord]:
    """One call per case the selection must tell apart; the name says what it is."""
    c: dict[str, CallRecord] = {}
    c["teacher"] = make("teacher", "red shoes", 2)
    c["shadow_of_teacher"] = make("shadow", "red shoes", 1, role="shadow", parent_id=c["teacher"].id, agreement=True)
    c["teacher_dup"] = make("dup", "  red    shoes ", 3)
    c["teacher_invalid"] = make("inv", "blue hats", 4, response=BAD, valid=False, error_type="no_tool_call")
    c["eval"] = make("eval", "green socks", 5, source="eval")
    c["held_out"] = make("held", "wool scarf", 6, held_out=True)
    c["held_out_dup"] = make("held dup", "wool scarf", 7)
    c["shadow_of_held_out"] = make("held shadow", "wool scarf", 7, role="shadow", parent_id=c["held_out"].id,
                                   agreement=True)
    tool_turns = [{"role": "assistant", "content": None, "tool_calls": answer("boots")["tool_calls"]},
                  {"role": "tool", "tool_call_id": "c1", "content": '{"hits": 0}'}]
    c["student_liked"] = make("liked", "boots", 8, role="student", extra=tool_turns)
    c["student_disliked"] = make("disliked", "sandals", 9, role="student")
    c["student_unjudged"] = make("unjudged", "slippers", 10, role="student")
    c["shadow_agreed"] = make("agreed", "clogs", 11, role="shadow", agreement=True)
    c["student_failed"] = make("failed", "gloves", 12, role="student", response=BAD, valid=False,
                               error_type="no_tool_call")
    c["fallback"] = make("fallback", "gloves", 13, parent_id=c["student_failed"].id, fallback_reason="invalid")
    c["teacher_shadowed"] = make("shadowed", "belts", 14)
    c["shadow_disagreed"] = make("disagreed", "belts", 15, role="shadow", parent_id=c["teacher_shadowed"].id,
                                 agreement=False, response=answer("belt"))
    c["other_route"] = make("other", "caps", 16, route="other")
    return c


FEEDBACK = {"student_liked": dict(success=True), "student_disliked": dict(score=-1.0)}
KEPT = ["teacher", "student_liked", "shadow_agreed", "fallback", "teacher_shadowed"]
DROPPED = {"invalid": 3, "eval": 1, "held_out": 3, "unconfirmed_student": 2, "duplicate": 2}


@pytest.fixture
def calls() -> dict[str, CallRecord]:
    seeded = seed()
    with CaptureStore.open(STORE) as store:
        for call in seeded.values():
            store.record(call)
        for name, judgement in FEEDBACK.items():
            store.add_feedback(seeded[name].id, **judgement)
    return seeded


def verdicts(c: dict[str, CallRecord]) -> dict[str, bool]:
    return ds.feedback_verdicts((c[name].id, j.get("score"), j.get("success")) for name, j in FEEDBACK.items())


def slmswap(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """`slmswap dataset ...` through app.cli.main (its error printing and exit codes), registered as the lead will."""
    local = typer.Typer()
    local.add_typer(dataset_app, name="dataset")
    monkeypatch.setattr(cli, "app", local)
    monkeypatch.setattr(sys, "argv", ["slmswap", "dataset", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- selection (pure) ------------------------------------------------------------------------------------

def test_select_keeps_exactly_the_confirmed_answers_and_tallies_the_rest():
    c = seed()
    sel = ds.select(c.values(), verdicts(c), routes=["retrieval"])
    assert sorted(ex.id for ex in sel.kept) == sorted(c[name].id for name in KEPT)
    assert dict(sel.dropped) == DROPPED
    assert dict(sel.invalid_types) == {"no_tool_call": 2, "negative_feedback": 1}


def test_select_is_independent_of_order_and_a_teacher_wins_a_duplicate():
    c = seed()
    first = ds.select(c.values(), verdicts(c))
    shuffled = list(c.values())
    random.Random(7).shuffle(shuffled)
    again = ds.select(shuffled, verdicts(c))
    assert [ex.id for ex in again.kept] == [ex.id for ex in first.kept]
    # The shadow of "red shoes" was recorded first, yet the teacher's answer is the one kept.
    assert c["teacher"].id in {ex.id for ex in first.kept} and len(first.kept) == len(KEPT) + 1  # + other route


def test_feedback_verdict_is_negative_when_any_judgement_is():
    rows = [("a", None, True), ("a", -1.0, None), ("b", 2.0, None), ("c", 0.0, None), ("d", 0.5, False)]
    assert ds.feedback_verdicts(rows) == {"a": False, "b": True, "c": False, "d": False}


def test_cap_per_route_drops_the_rest_as_over_cap():
    c = seed()
    sel = ds.select(c.values(), verdicts(c), cap=2)
    assert {r: sum(ex.route == r for ex in sel.kept) for r in ("retrieval", "other")} == {"retrieval": 2, "other": 1}
    assert sel.dropped["over_cap"] == len(KEPT) - 2


def test_split_is_stable_and_follows_the_input_hash():
    c = seed()
    kept = ds.select(c.values(), verdicts(c)).kept
    a, b = ds.split(kept, 50), ds.split(list(reversed(kept)), 50)
    assert {k: sorted(e.id for e in v) for k, v in a.items()} == {k: sorted(e.id for e in v) for k, v in b.items()}
    assert a["train"] and a["val"]  # 50% of 6 inputs: a split that put everything on one side would fail here
    assert all(ds.split_of(e.key, 50) == name for name, exs in a.items() for e in exs)
    assert ds.split_of("0" * 64, 10) == "val" and ds.split_of("ff" * 32, 10) == "train"


# ---- rows ------------------------------------------------------------------------------------------------

def test_hermes_row_is_what_chat_format_renders_for_the_same_messages():
    c = seed()
    ex = ds.example_of(c["student_liked"])
    row = ds.to_hermes(ex)
    conv = row["conversations"]
    assert [t["from"] for t in conv] == ["system", "human", "gpt", "human", "gpt"]
    assert conv[-1]["value"] == hermes.assistant_text(None, [("search", json.dumps({"q": "boots"}))])
    assert conv[-1]["value"].startswith(hermes.TOOL_OPEN) and conv[3]["value"].startswith(hermes.RESPONSE_OPEN)
    assert conv[0]["value"] == "You find products.\n\n" + hermes.tools_prompt([TOOLS[0]["function"]])
    # The prompt part, rendered as the backend renders a request, is the served prompt to the character.
    messages = [Message.model_validate(m) for m in ex.messages]
    turns = [chat_format.Turn({"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), t["value"])
             for t in conv[:-1]]
    assert chat_format.render_chatml(turns) == chat_format.render_prompt(messages, [TOOLS[0]["function"]], "chatml")


def test_openai_row_is_the_request_plus_the_answer():
    c = seed()
    row = ds.to_openai(ds.example_of(c["teacher"]))
    assert row["tools"] == TOOLS and row["messages"][:-1] == c["teacher"].request["messages"]
    assert row["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": answer("red shoes")["tool_calls"]}


def test_preference_pairs_from_a_fallback_and_a_shadow_disagreement():
    c = seed()
    pairs = {p.example.id: p for p in ds.preference_pairs(c.values(), verdicts(c))}
    assert set(pairs) == {c["fallback"].id, c["teacher_shadowed"].id}
    fallback = ds.to_pair(pairs[c["fallback"].id])
    assert fallback["why"] == "no_tool_call"
    assert fallback["rejected"] == [{"role": "assistant", "content": BAD["content"]}]
    assert fallback["chosen"][0]["content"] == hermes.format_call("search", '{"q": "gloves"}')
    shadow = ds.to_pair(pairs[c["teacher_shadowed"].id])
    assert shadow["why"] == "disagreement"
    assert shadow["rejected"][0]["content"] == hermes.format_call("search", '{"q": "belt"}')
    assert [t["role"] for t in shadow["prompt"]] == ["system", "user"]


def test_no_pair_from_a_held_out_or_eval_fallback():
    c = seed()
    failed = make("f", "mittens", 20, role="student", response=BAD, valid=False, held_out=True)
    held = make("t", "mittens", 21, parent_id=failed.id, fallback_reason="invalid")
    failed_eval = make("f", "scarves", 22, role="student", response=BAD, valid=False, source="eval")
    evaluated = make("t", "scarves", 23, parent_id=failed_eval.id, fallback_reason="invalid", source="eval")
    pairs = ds.preference_pairs([*c.values(), failed, held, failed_eval, evaluated], verdicts(c))
    assert {p.example.id for p in pairs} == {c["fallback"].id, c["teacher_shadowed"].id}


# ---- the CLI on a real store -----------------------------------------------------------------------------

def test_build_writes_rows_reports_drops_and_is_the_same_twice(calls, capsys, monkeypatch, tmp_path):
    code, out, err = slmswap(capsys, monkeypatch, "build", "--route", "retrieval", "--min-examples", "5",
                             "--val-percent", "50", "--out", "ds1")
    assert code == 0, err
    written = rows(tmp_path / "ds1" / "train.jsonl") + rows(tmp_path / "ds1" / "val.jsonl")
    assert sorted(r["id"] for r in written) == sorted(calls[name].id for name in KEPT)
    manifest = json.loads((tmp_path / "ds1" / "manifest.json").read_text())
    assert manifest["dropped"] == DROPPED and manifest["kind"] == "hermes"
    assert "unconfirmed_student" in out and "no_tool_call" in out and "retrieval" in out
    from datasets import load_from_disk

    hf = load_from_disk(str(tmp_path / "ds1" / "hf"))
    assert sorted([*hf["train"]["id"], *hf["val"]["id"]]) == sorted(r["id"] for r in written)
    code, _, err = slmswap(capsys, monkeypatch, "build", "--route", "retrieval", "--min-examples", "5",
                           "--val-percent", "50", "--out", "ds2")
    assert code == 0, err
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "ds1" / name).read_text() == (tmp_path / "ds2" / name).read_text()


def test_build_openai_format_round_trips_through_read_dataset(calls, capsys, monkeypatch, tmp_path):
    code, _, err = slmswap(capsys, monkeypatch, "build", "--format", "openai", "--min-examples", "1",
                           "--val-percent", "0", "--out", "oa")
    assert code == 0, err
    loaded = ds.read_dataset(tmp_path / "oa")
    assert loaded.kind == "openai" and len(loaded.splits["train"]) == len(KEPT) + 1 and not loaded.splits["val"]
    assert all(r["messages"][-1]["role"] == "assistant" and r["tools"] == TOOLS for r in loaded.splits["train"])


def test_too_few_examples_exits_2_saying_how_many(calls, capsys, monkeypatch, tmp_path):
    code, _, err = slmswap(capsys, monkeypatch, "build", "--route", "retrieval", "--out", "small")
    assert code == 2 and "only 5 examples" in err and "--min-examples is 100" in err
    assert not (tmp_path / "small").exists()


def test_pairs_command_writes_both_pairs(calls, capsys, monkeypatch, tmp_path):
    code, out, err = slmswap(capsys, monkeypatch, "pairs", "--val-percent", "0", "--out", "pairs")
    assert code == 0, err
    loaded = ds.read_dataset(tmp_path / "pairs")
    assert loaded.kind == "pairs" and sorted(r["why"] for r in loaded.splits["train"]) == ["disagreement",
                                                                                          "no_tool_call"]
    assert "disagreement" in out


def test_out_folder_that_is_not_a_dataset_is_refused(calls, capsys, monkeypatch, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = slmswap(capsys, monkeypatch, "build", "--min-examples", "1", "--out", "mine")
    assert code == 2 and "not a dataset folder" in err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("args, message", [(["--format", "alpaca"], "--format 'alpaca' is unknown"),
                                           (["--val-percent", "80"], "--val-percent must be between 0 and 50")])
def test_bad_options_exit_2(calls, capsys, monkeypatch, args, message):
    code, _, err = slmswap(capsys, monkeypatch, "build", *args, "--out", "x")
    assert code == 2 and message in err


# ---- BFCL ------------------------------------------------------------------------------------------------

def test_from_bfcl_writes_300_ground_truth_rows(capsys, monkeypatch, tmp_path):
    code, out, err = slmswap(capsys, monkeypatch, "from-bfcl", "--category", "simple_python", "--items", "0-299",
                             "--out", "bfcl")
    assert code == 0, err
    loaded = ds.read_dataset(tmp_path / "bfcl")
    written = loaded.splits["train"] + loaded.splits["val"]
    assert len(written) == 300 and loaded.splits["val"]
    assert sorted(r["id"] for r in written) == sorted(f"simple_python_{i}" for i in range(300))
    item = load_category("simple_python", limit=1)[0]
    first = next(r for r in written if r["id"] == item.id)
    expected = [(c.name, c.arguments) for c in reference_calls(item.possible_answer)]
    assert first["conversations"][-1]["value"] == hermes.assistant_text(None, expected)
    assert first["conversations"][1] == {"from": "human", "value": item.messages[0]["content"]}


@pytest.mark.parametrize("items", ["300-399", "250-300", "399", "0-399"])
def test_from_bfcl_refuses_held_out_items(capsys, monkeypatch, tmp_path, items):
    code, _, err = slmswap(capsys, monkeypatch, "from-bfcl", "--items", items, "--out", "bfcl")
    assert code == 2 and "300-399 of simple_python are held out" in err
    assert not (tmp_path / "bfcl").exists()


def test_bfcl_items_spec_errors():
    with pytest.raises(UsageError, match="not a range"):
        ds.parse_items("5-2")
    with pytest.raises(UsageError, match="goes past the end"):
        ds.bfcl_examples("multiple", range(0, 10_000))


# ---- reading ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ['{"id": "x", "route": "r", "conversations": [{"from": "human", "value": "hi"}]}',
                                 '{"id": "x", "route": "r", "conversations": [{"from": "bot", "value": "hi"}]}',
                                 '{"id": "x"', '{"id": "x", "route": "r", "conversations": [], "extra": 1}'])
def test_malformed_row_names_path_and_line(calls, capsys, monkeypatch, tmp_path, bad):
    code, _, err = slmswap(capsys, monkeypatch, "build", "--min-examples", "1", "--val-percent", "0", "--out", "ds")
    assert code == 0, err
    train = tmp_path / "ds" / "train.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n")
    with pytest.raises(UsageError, match=rf"{train}:2: .*nothing was trained"):
        ds.read_dataset(tmp_path / "ds")
    code, _, err = slmswap(capsys, monkeypatch, "check", "ds")
    assert code == 2 and "train.jsonl:2:" in err
    train.write_text("\n".join(lines) + "\n")
    code, out, err = slmswap(capsys, monkeypatch, "check", "ds")
    assert code == 0 and "every row is well-formed" in out, err
