"""The registry: model rows and loop runs in the store (SQLite and PostgreSQL), `slmswap models list|promote`."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from app.capture.records import LoopRunRecord, ModelRecord, utcnow
from app.capture.store import CaptureStore
from app.config import load_settings
from app.errors import UsageError
from tests.test_cli import slmswap


def model(route: str = "retrieval", **kw) -> ModelRecord:
    return ModelRecord(**{"route": route, "base": "gguf:smollm2-135m",
                          "binding": "gguf:smollm2-135m?lora=/tmp/a.gguf", **kw})


def test_models_are_stored_listed_found_by_prefix_and_change_status(store_url):
    now = utcnow()
    with CaptureStore.open(store_url) as store:
        old = store.add_model(model(id="aa11", created_at=now - timedelta(hours=1), metrics={"train": {"loss": 1.5}},
                                    dataset_hash="h1", adapter="/runs/1/adapter", gguf="/runs/1/a.gguf"))
        new = store.add_model(model(id="aa22", created_at=now))
        store.add_model(model("processing", id="bb33"))
        assert [m.id for m in store.list_models(route="retrieval")] == ["aa22", "aa11"]
        assert store.get_model("aa11") == old  # every field round-trips, the time in UTC
        assert store.get_model("aa2") == new
        with pytest.raises(UsageError, match="matches more than one model"):
            store.get_model("aa")
        with pytest.raises(UsageError, match="slmswap models list"):
            store.get_model("zz")
        store.set_model_status("aa11", "retired")
        store.update_model_metrics("aa22", {"eval": {"exact": {"t": 1.0}}})
        assert store.get_model("aa11").status == "retired"
        assert store.get_model("aa22").metrics == {"eval": {"exact": {"t": 1.0}}}
        assert [m.id for m in store.list_models(status="candidate")] == ["bb33", "aa22"]
        with pytest.raises(UsageError, match="candidate, failed, promoted, retired"):
            store.set_model_status("aa11", "best")
        with pytest.raises(UsageError, match="no model has id"):
            store.set_model_status("nope", "retired")
        with pytest.raises(UsageError, match="not 'best'"):
            store.add_model(model(status="best"))


def test_loop_runs_are_rewritten_by_id_and_listed_newest_first(store_url):
    with CaptureStore.open(store_url) as store:
        first = LoopRunRecord(route="retrieval", status="skipped", reason="3 new", started_at=utcnow() - timedelta(1))
        store.add_loop_run(first)
        run = LoopRunRecord(route="retrieval", status="running", reason="started")
        store.add_loop_run(run)
        done = LoopRunRecord(route="retrieval", status="failed", reason="train failed: boom", id=run.id,
                             started_at=run.started_at, finished_at=utcnow(),
                             steps=[{"step": "train", "decision": "failed", "error": "boom"}])
        store.add_loop_run(done)
        assert store.list_loop_runs(route="retrieval") == [done, first]
        assert store.list_loop_runs(route="processing") == []


@pytest.fixture
def registered(scripted):
    Path("slmswap.toml").write_text('[routes.support]\nteacher = "scripted:t"\nstudent = "scripted:old"\n')
    with CaptureStore.open(load_settings().store.url) as store:
        store.add_model(model("support", id="1111aaaa", binding="scripted:first", status="promoted"))
        store.add_model(model("support", id="2222bbbb", binding="scripted:second",
                              metrics={"eval": {"exact": {"scripted:t": 1.0, "scripted:second": 0.5}}}))


def test_models_list_shows_the_registry(capsys, registered):
    code, out, _ = slmswap(capsys, "models", "list", "--route", "support")
    assert code == 0 and "2222bbbb" in out and "50% (100%)" in out and "promoted" in out
    code, out, _ = slmswap(capsys, "models", "list", "--json")
    rows = json.loads(out)
    assert [(r["id"], r["status"], r["binding"]) for r in rows] == [
        ("2222bbbb", "candidate", "scripted:second"), ("1111aaaa", "promoted", "scripted:first")]


def test_models_promote_makes_it_the_student_at_shadow_with_evidence_and_retires_the_last(capsys, registered):
    code, out, err = slmswap(capsys, "models", "promote", "2222", "--route", "support")
    assert code == 0, err
    assert "support: student scripted:second at stage shadow" in out
    with CaptureStore.open(load_settings().store.url) as store:
        state = store.route_states()["support"]
        [change] = store.stage_changes(route="support")
        statuses = {m.id: m.status for m in store.list_models()}
    assert (state.stage, state.student) == ("shadow", "scripted:second")
    assert (change.old_stage, change.new_stage) == ("teacher", "shadow")
    assert change.evidence["model_id"] == "2222bbbb" and change.evidence["previous_student"] == "scripted:old"
    assert statuses == {"2222bbbb": "promoted", "1111aaaa": "retired"}


def test_models_promote_refuses_an_unknown_route_or_model_and_changes_nothing(capsys, registered):
    code, _, err = slmswap(capsys, "models", "promote", "2222", "--route", "nope")
    assert code == 2 and "no route is named 'nope'; the routes are: orchestrator, retrieval" in err
    assert "support" in err
    code, _, err = slmswap(capsys, "models", "promote", "9999", "--route", "support")
    assert code == 2 and "no model has an id starting with '9999'" in err
    with CaptureStore.open(load_settings().store.url) as store:
        assert store.route_states() == {} and store.get_model("2222").status == "candidate"
