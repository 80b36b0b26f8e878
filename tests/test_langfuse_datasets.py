"""`slmswap dataset push-langfuse | pull-langfuse`: the real CLI entry point, a real SQLite store, the real Langfuse
SDK, and a loopback receiver that answers the REST requests the SDK makes (tests/support/langfuse_receiver.py)."""

from __future__ import annotations

import dataclasses
import json
import socket
import uuid
from pathlib import Path

import pytest

from app import observability
from app.capture.store import CaptureStore
from app.config import load_settings
from tests.support.langfuse_fixtures import fresh_client, receiver  # noqa: F401 (pytest fixtures)
from tests.test_datasets import FEEDBACK, KEPT, STORE, TOOLS, rows, seed, slmswap
from training import datasets as ds
from training import langfuse_datasets as lfd

NAME = "retrieval-v1"


@pytest.fixture
def secret(monkeypatch):
    value = f"sk-lf-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", f"pk-lf-{uuid.uuid4().hex}")  # fresh: the SDK keeps one per key
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", value)
    return value


@pytest.fixture
def langfuse(receiver, secret, monkeypatch):
    monkeypatch.setenv("LANGFUSE_BASE_URL", receiver.url)
    return receiver


@pytest.fixture
def calls():
    """test_datasets' seed (one call per selection case), each with a template id, in the test's SQLite store."""
    seeded = {name: dataclasses.replace(call, template_id=f"{call.route}/base@{n}")
              for n, (name, call) in enumerate(seed().items())}
    with CaptureStore.open(STORE) as store:
        for call in seeded.values():
            store.record(call)
        for name, judgement in FEEDBACK.items():
            store.add_feedback(seeded[name].id, **judgement)
    return seeded


def run(capsys, monkeypatch, *args):
    return slmswap(capsys, monkeypatch, *args)


def push(capsys, monkeypatch, *extra):
    code, out, err = run(capsys, monkeypatch, "push-langfuse", "--name", NAME, "--route", "retrieval", *extra)
    assert code == 0, err
    return out


def sdk_client():
    return observability.client(load_settings())


# ---- push ------------------------------------------------------------------------------------------------

def test_push_sends_one_item_per_selected_call_with_its_input_answer_and_facts(langfuse, calls, capsys, monkeypatch):
    out = push(capsys, monkeypatch)
    assert f"pushed {len(KEPT)} items to dataset {NAME!r} at {langfuse.url}" in out
    posts = [r for r in langfuse.requests if r["method"] == "POST"]
    assert [r["path"] for r in posts] == ["/api/public/v2/datasets"] + ["/api/public/dataset-items"] * len(KEPT)
    assert posts[0]["body"]["name"] == NAME
    sent = {r["body"]["metadata"]["call_id"]: r["body"] for r in posts[1:]}
    assert sorted(sent) == sorted(calls[name].id for name in KEPT)
    for name in KEPT:
        call, item = calls[name], sent[calls[name].id]
        assert item["id"] == lfd.item_id(NAME, call.id) and item["datasetName"] == NAME
        assert item["input"]["messages"] == call.request["messages"] and item["input"]["tools"] == TOOLS
        assert item["input"]["tool_choice"] == "auto"
        assert item["expectedOutput"] == {"role": "assistant", "content": None,
                                          "tool_calls": call.response["tool_calls"]}
        assert item["metadata"] == {"route": "retrieval", "call_id": call.id, "source": "slmswap",
                                    "template_id": call.template_id, "binding": call.binding, "role": call.role}
    assert all(r["status"] == 200 for r in langfuse.requests)


def test_a_re_push_updates_the_same_items_instead_of_adding(langfuse, calls, capsys, monkeypatch):
    push(capsys, monkeypatch)
    first = dict(langfuse.rest.items)
    push(capsys, monkeypatch)
    assert sorted(langfuse.rest.items) == sorted(first) and len(first) == len(KEPT)
    assert len(langfuse.rest.datasets) == 1
    # the same call in another dataset is another item: Langfuse refuses an id reused across datasets
    assert lfd.item_id("other", calls["teacher"].id) not in first


def test_push_of_nothing_selected_exits_2(langfuse, calls, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, "push-langfuse", "--name", NAME, "--route", "nowhere")
    assert code == 2 and "no calls to push" in err
    assert not langfuse.requests


# ---- pull ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["hermes", "openai"])
def test_pull_writes_the_rows_build_writes_for_the_same_calls(langfuse, calls, capsys, monkeypatch, tmp_path, fmt):
    push(capsys, monkeypatch)
    code, out, err = run(capsys, monkeypatch, "pull-langfuse", "--name", NAME, "--format", fmt, "--val-percent", "50",
                         "--out", "pulled")
    assert code == 0, err
    code, _, err = run(capsys, monkeypatch, "build", "--route", "retrieval", "--format", fmt, "--val-percent", "50",
                       "--min-examples", "1", "--out", "built")
    assert code == 0, err
    for split in ("train", "val"):
        pulled, built = rows(tmp_path / "pulled" / f"{split}.jsonl"), rows(tmp_path / "built" / f"{split}.jsonl")
        if fmt == "hermes":  # the row id is the item id; everything the model learns is the same
            assert sorted(r["id"] for r in pulled) == sorted(lfd.item_id(NAME, r["id"]) for r in built)
            pulled, built = ([{**r, "id": None} for r in rs] for rs in (pulled, built))
        key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
        assert sorted(pulled, key=key) == sorted(built, key=key)
    assert len(ds.read_dataset(tmp_path / "pulled").splits["train"]) >= 1
    manifest = json.loads((tmp_path / "pulled" / "manifest.json").read_text())
    assert manifest["source"] == f"langfuse:{NAME}" and manifest["items"] == len(KEPT) and manifest["dropped"] == {}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no staging folder left


def test_pull_drops_bad_items_with_counts_and_reasons(langfuse, capsys, monkeypatch, tmp_path):
    client = sdk_client()
    client.create_dataset(name="mixed")
    question = {"messages": [{"role": "user", "content": "red shoes"}], "tools": TOOLS}
    dict_args = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "search", "arguments": {"q": "red"}}}]}
    items = [
        dict(input="What is 2+2?", expected_output="4"),                     # kept: plain strings
        dict(input=question, expected_output=dict_args),                      # kept: arguments as an object
        dict(input="What is 2+2?", expected_output="four"),                   # duplicate input
        dict(input="no answer here", expected_output=None),                   # no_expected_output
        dict(input={"prompt": "not messages"}, expected_output="x"),          # bad_input
        dict(input=[{"role": "wizard", "content": "hi"}], expected_output="x"),  # bad_input: unknown role
        dict(input="hi", expected_output=["a", "list"]),                      # bad_expected_output
        dict(input="archived one", expected_output="x", status="ARCHIVED"),   # archived
    ]
    for item in items:
        client.create_dataset_item(dataset_name="mixed", **item)
    code, out, err = run(capsys, monkeypatch, "pull-langfuse", "--name", "mixed", "--format", "openai",
                         "--val-percent", "0", "--out", "mixed")
    assert code == 0, err
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert manifest["dropped"] == {"duplicate": 1, "no_expected_output": 1, "bad_input": 2,
                                   "bad_expected_output": 1, "archived": 1}
    assert "wizard" in manifest["dropped_examples"]["bad_input"] or "messages" in manifest["dropped_examples"][
        "bad_input"]
    written = rows(tmp_path / "mixed" / "train.jsonl")
    assert written[0]["messages"][-1] == {"role": "assistant", "content": "4"}
    assert json.loads(written[1]["messages"][-1]["tool_calls"][0]["function"]["arguments"]) == {"q": "red"}
    assert "bad_input" in out and "archived" in out


def test_pull_of_an_unknown_dataset_exits_2_naming_it_and_the_host(langfuse, capsys, monkeypatch, tmp_path):
    code, _, err = run(capsys, monkeypatch, "pull-langfuse", "--name", "missing", "--out", "x")
    assert code == 2 and "'missing'" in err and langfuse.url in err
    assert not (tmp_path / "x").exists()


def test_pull_of_only_bad_items_writes_nothing(langfuse, capsys, monkeypatch, tmp_path):
    client = sdk_client()
    client.create_dataset(name="empty")
    client.create_dataset_item(dataset_name="empty", input="q", expected_output=None)
    code, _, err = run(capsys, monkeypatch, "pull-langfuse", "--name", "empty", "--out", "x")
    assert code == 2 and "0 usable items of 1" in err and "no_expected_output 1" in err
    assert not (tmp_path / "x").exists()


# ---- Langfuse unreachable, keys wrong or missing ---------------------------------------------------------

def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once the block ends: connections are refused


def test_unreachable_langfuse_exits_1_naming_the_host_and_writes_nothing(calls, secret, capsys, monkeypatch,
                                                                         tmp_path):
    url = closed_port_url()
    monkeypatch.setenv("LANGFUSE_BASE_URL", url)
    code, _, err = run(capsys, monkeypatch, "push-langfuse", "--name", NAME)
    assert code == 1 and f"cannot reach Langfuse at {url}" in err and "Connection refused" in err
    assert secret not in err
    code, _, err = run(capsys, monkeypatch, "pull-langfuse", "--name", NAME, "--out", "x")
    assert code == 1 and url in err and secret not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".slmswap"]


def test_rejected_keys_exit_2_naming_the_host_never_the_secret(langfuse, calls, secret, capsys, monkeypatch,
                                                               tmp_path):
    langfuse.fail_with(401)
    code, _, err = run(capsys, monkeypatch, "push-langfuse", "--name", NAME)
    assert code == 2 and f"Langfuse at {langfuse.url} refused the keys (HTTP 401)" in err
    assert "LANGFUSE_SECRET_KEY" in err and secret not in err and "Unauthorized. Please check" not in err
    code, _, err = run(capsys, monkeypatch, "pull-langfuse", "--name", NAME, "--out", "x")
    assert code == 2 and "refused the keys" in err and not (tmp_path / "x").exists()


def test_without_keys_exits_2_saying_which_to_set(calls, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, "push-langfuse", "--name", NAME)
    assert code == 2 and "LANGFUSE_PUBLIC_KEY" in err and "LANGFUSE_SECRET_KEY" in err


def test_a_pull_failing_midway_leaves_the_earlier_dataset_as_it_was(langfuse, capsys, monkeypatch, tmp_path):
    client = sdk_client()
    client.create_dataset(name="big")
    for n in range(60):  # two pages of 50: the second page fails
        client.create_dataset_item(dataset_name="big", input=f"question {n}", expected_output=f"answer {n}")
    code, _, err = run(capsys, monkeypatch, "pull-langfuse", "--name", "big", "--val-percent", "0", "--out", "ds")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").glob("*.jsonl")}
    assert len(rows(tmp_path / "ds" / "train.jsonl")) == 60
    langfuse.fail_after(2, 500)  # datasets.get and the first page answer, then the server fails
    code, _, err = run(capsys, monkeypatch, "pull-langfuse", "--name", "big", "--format", "openai", "--out", "ds")
    assert code == 1 and "HTTP 500" in err and langfuse.url in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").glob("*.jsonl")} == before
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["kind"] == "hermes"
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# ---- items (pure) ----------------------------------------------------------------------------------------

def test_from_item_reads_our_request_shape_and_rejects_an_input_ending_with_the_answer():
    request = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": "required",
               "parallel_tool_calls": False}
    ex = lfd.from_item({"id": "i1", "input": request, "expectedOutput": {"content": "hello"},
                        "metadata": {"route": "retrieval"}}, route="langfuse:x")
    assert (ex.route, ex.tools, ex.tool_choice, ex.parallel_tool_calls) == ("retrieval", TOOLS, "required", False)
    assert ex.key == ds.input_key(request) and ex.answer == {"content": "hello", "tool_calls": None}
    with pytest.raises(lfd.BadItem) as bad:
        lfd.from_item({"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                       "expectedOutput": "x"}, route="r")
    assert bad.value.reason == "bad_input" and "expected output" in str(bad.value)


def test_write_atomically_leaves_the_old_folder_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "manifest.json").write_text('{"kind": "hermes"}')

    def broken(out: Path, *args):
        (out / "train.jsonl").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(ds, "write_dataset", broken)
    with pytest.raises(OSError):
        lfd.write_atomically(target, {}, "hermes", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"] and [p.name for p in target.iterdir()] == [
        "manifest.json"]
