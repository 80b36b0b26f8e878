"""Langfuse prompt management: push a route's templates as the versions and labels of one Langfuse prompt, pull
them back; the real Langfuse SDK against a loopback receiver that answers the REST requests it makes."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import pytest

from app import observability
from app.config import load_settings
from app.errors import UsageError
from app.langfuse_rest import LangfuseError, LangfuseNotFound, rest_client
from prompts import langfuse_prompts as lp
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.langfuse_fixtures import fresh_client  # noqa: F401 (pytest fixtures)

NAME = "slmswap/retrieval"


@dataclass(frozen=True)
class T:
    """A template row as push reads it (id, text, origin)."""

    id: str
    text: str
    origin: str = "evolved"


BASE = T("retrieval/base@1", "You fetch data. Answer with one tool call.", "base")
RULE = T("retrieval/e1", "You fetch data. Answer with one tool call. Use parameter `query`, not `q`.")
FENCE = T("retrieval/e2", "You fetch data. Output only the JSON object, no markdown fences.")


@pytest.fixture
def secret(monkeypatch):
    value = f"sk-lf-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", f"pk-lf-{uuid.uuid4().hex}")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", value)
    return value


@pytest.fixture
def receiver(secret, monkeypatch):
    with LangfuseReceiver() as r:
        monkeypatch.setenv("LANGFUSE_BASE_URL", r.url)
        yield r


def client():
    return rest_client(load_settings())


def push(best, live, route="retrieval"):
    langfuse, host = client()
    report = lp.PushReport(host)
    lp.push_route(langfuse, host, route, best, live, report)
    return report


def versions(receiver, name=NAME):
    return {p["version"]: p for p in receiver.rest.prompts.get(name, [])}


def labelled(receiver, label, name=NAME):
    found = [p for p in receiver.rest.prompts.get(name, []) if label in p["labels"]]
    assert len(found) <= 1, f"{label} on {len(found)} versions"
    return found[0] if found else None


def writes(receiver):
    return [(r["method"], r["path"]) for r in receiver.requests if r["method"] in ("POST", "PATCH")]


# ---- labels and steps (pure) -----------------------------------------------------------------------------

def test_best_is_production_and_the_others_are_numbered_candidates():
    assert [(t.id, labels) for t, labels in lp.wanted_labels(RULE, [BASE, RULE, FENCE])] == [
        (RULE.id, ("production",)), (BASE.id, ("candidate",)), (FENCE.id, ("candidate-2",))]
    assert lp.is_pulled_label("candidate-12") and not lp.is_pulled_label("latest") and not lp.is_pulled_label("x")


def test_a_prompt_already_in_sync_needs_no_step_and_leftover_labels_go_to_production():
    remote = [lp.RemoteVersion(1, BASE.text, ("production", "latest"), {}),
              lp.RemoteVersion(2, RULE.text, ("candidate",), {}), lp.RemoteVersion(3, FENCE.text, ("candidate-2",), {})]
    assert lp.push_steps("retrieval", BASE, [BASE, RULE, FENCE], remote) == []
    steps = lp.push_steps("retrieval", BASE, [BASE, RULE], remote)  # FENCE retired: candidate-2 is left over
    assert [(s.version, s.labels) for s in steps] == [(1, ("production", "candidate-2"))]


@pytest.mark.parametrize("route", ["", "a|b"])
def test_a_route_that_cannot_name_a_prompt_is_refused(route):
    with pytest.raises(UsageError, match="cannot name a Langfuse prompt"):
        lp.prompt_name(route)


# ---- push against the SDK --------------------------------------------------------------------------------

def test_first_push_creates_one_text_version_per_live_template_with_its_label_and_id(receiver):
    report = push(BASE, [BASE, RULE, FENCE])
    assert [(tid, labels) for _, tid, labels in report.created] == [
        (BASE.id, ("production",)), (RULE.id, ("candidate",)), (FENCE.id, ("candidate-2",))]
    assert writes(receiver) == [("POST", "/api/public/v2/prompts")] * 3
    stored = versions(receiver)
    assert {v: (p["prompt"], p["type"], p["config"]["template_id"]) for v, p in stored.items()} == {
        1: (BASE.text, "text", BASE.id), 2: (RULE.text, "text", RULE.id), 3: (FENCE.text, "text", FENCE.id)}
    assert stored[1]["config"] == {"template_id": BASE.id, "route": "retrieval", "origin": "base",
                                   "source": "slmswap"}
    assert all(p["tags"] == ["slmswap"] for p in stored.values())
    assert labelled(receiver, "production")["version"] == 1 and labelled(receiver, "candidate-2")["version"] == 3


def test_a_second_push_sends_nothing_and_a_new_best_only_moves_labels(receiver):
    push(BASE, [BASE, RULE, FENCE])
    before = len(writes(receiver))
    report = push(BASE, [BASE, RULE, FENCE])
    assert report.unchanged == ["retrieval"] and len(writes(receiver)) == before
    report = push(RULE, [BASE, RULE, FENCE])  # RULE won its trials
    assert not report.created and len(versions(receiver)) == 3
    assert labelled(receiver, "production")["prompt"] == RULE.text
    assert labelled(receiver, "candidate")["prompt"] == BASE.text
    assert ("PATCH", f"/api/public/v2/prompts/{NAME.replace('/', '%2F')}/versions/2") in writes(receiver)


def test_a_retired_template_loses_its_label_and_a_new_one_is_created(receiver):
    push(BASE, [BASE, RULE, FENCE])
    NEW = T("retrieval/e3", "You fetch data. Q4 means months 2025-10 to 2025-12.")
    push(BASE, [BASE, NEW])  # RULE and FENCE retired, NEW evolved
    assert labelled(receiver, "candidate")["prompt"] == NEW.text
    assert labelled(receiver, "candidate-2")["prompt"] == BASE.text  # moved onto production, off the retired one
    retired = [p for p in versions(receiver).values() if p["prompt"] in (RULE.text, FENCE.text)]
    assert all(not any(lp.is_pulled_label(label) for label in p["labels"]) for p in retired)


# ---- fetch (the read half of pull) -----------------------------------------------------------------------

def test_fetch_returns_each_labelled_version_once_with_its_route_and_template_id(receiver):
    push(BASE, [BASE, RULE, FENCE])
    push(BASE, [BASE, RULE])  # candidate-2 now also on the production version
    langfuse, host = client()
    # someone edits the production prompt in Langfuse's UI: a new version, config copied from its parent
    langfuse.create_prompt(name=NAME, prompt=BASE.text + " Be brief.", labels=["production"],
                           config={"template_id": BASE.id, "route": "retrieval"})
    langfuse.create_prompt(name="someone-else/prompt", prompt="not ours", labels=["production"])
    pulled = lp.fetch_prompts(langfuse, host)
    assert sorted((p.route, p.version, p.template_id, p.text) for p in pulled) == [
        ("retrieval", 1, BASE.id, BASE.text), ("retrieval", 2, RULE.id, RULE.text),
        ("retrieval", 4, BASE.id, BASE.text + " Be brief.")]
    assert [p.version for p in lp.fetch_prompts(langfuse, host, "retrieval")] == [p.version for p in pulled]


def test_fetch_of_a_route_without_a_prompt_names_the_push_command(receiver):
    langfuse, host = client()
    with pytest.raises(LangfuseNotFound, match="templates push --route orchestrator") as found:
        lp.fetch_prompts(langfuse, host, "orchestrator")
    assert receiver.url in str(found.value)


def test_fetch_failing_midway_raises_naming_the_host(receiver, secret):
    push(BASE, [BASE, RULE, FENCE])
    receiver.fail_after(2, 500)  # the listing and the first version answer, then the server fails
    langfuse, host = client()
    with pytest.raises(LangfuseError) as failed:
        lp.fetch_prompts(langfuse, host, "retrieval")
    assert receiver.url in str(failed.value) and "HTTP 500" in str(failed.value) and secret not in str(failed.value)


def test_push_to_an_unreachable_langfuse_or_with_refused_keys_names_the_host(receiver, secret, monkeypatch):
    receiver.fail_with(401)
    with pytest.raises(UsageError, match="refused the keys") as refused:
        push(BASE, [BASE])
    assert receiver.url in str(refused.value) and secret not in str(refused.value)
    observability.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("LANGFUSE_BASE_URL", url)
    with pytest.raises(LangfuseError, match=f"cannot reach Langfuse at {url}"):
        push(BASE, [BASE])


# ---- the CLI on a real store (prompts/store.py) ----------------------------------------------------------

def cli(capsys, monkeypatch, *args):
    import sys

    import typer

    from app import cli as cli_module
    from app.cli_templates_langfuse import add_langfuse_commands

    local, templates_app = typer.Typer(), typer.Typer()
    add_langfuse_commands(templates_app)
    local.add_typer(templates_app, name="templates")
    monkeypatch.setattr(cli_module, "app", local)
    monkeypatch.setattr(sys, "argv", ["slmswap", "templates", *args])
    try:
        cli_module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_push_then_pull_into_a_fresh_store_imports_as_langfuse_and_a_failed_pull_adds_nothing(
        receiver, capsys, monkeypatch, tmp_path):
    from app.capture.store import CaptureStore
    from prompts import store as templates

    with CaptureStore.open(load_settings().store.url) as store:
        templates.ensure_base(store, "retrieval")
        evolved = templates.add_template(store, "retrieval", RULE.text, origin="evolved")
    code, out, err = cli(capsys, monkeypatch, "push", "--route", "retrieval")
    assert code == 0, err
    assert labelled(receiver, "candidate")["config"]["template_id"] == evolved.id
    monkeypatch.setenv("SLMSWAP_STORE__URL", f"sqlite:///{tmp_path / 'other.db'}")
    receiver.fail_after(2, 500)
    code, _, err = cli(capsys, monkeypatch, "pull", "--route", "retrieval")
    assert code == 1 and receiver.url in err
    with CaptureStore.open(load_settings().store.url) as store:
        assert templates.live_templates(store, "retrieval") == []
    receiver.fail_with(None)
    code, out, err = cli(capsys, monkeypatch, "pull", "--route", "retrieval")
    assert code == 0, err
    with CaptureStore.open(load_settings().store.url) as store:
        pulled = templates.live_templates(store, "retrieval")
    assert sorted(t.text for t in pulled) == sorted([RULE.text, labelled(receiver, "production")["prompt"]])
    assert {t.origin for t in pulled} == {"langfuse"}
    code, out, err = cli(capsys, monkeypatch, "pull", "--route", "retrieval")
    assert code == 0 and "already in the store" in out
