"""The whole workflow on the real SmolLM2 GGUF (small limits so it stays quick): what `make demo` does."""

import json

from agents.orchestrator import collapse_repeats
from app.capture.store import CaptureStore
from tests.support.requires import require
from tests.test_cli import slmswap

require("llama_cpp")


def test_demo_query_runs_on_smollm2_and_captures_every_call(capsys, monkeypatch):
    monkeypatch.setenv("SLMSWAP_WORKFLOW__MAX_TOKENS", "64")
    monkeypatch.setenv("SLMSWAP_WORKFLOW__MAX_TOOL_TURNS", "1")
    monkeypatch.setenv("SLMSWAP_WORKFLOW__MAX_RETRIES", "0")
    code, out, err = slmswap(capsys, "run", "Analyze Q4 sales by region and write a short report", "--json")
    assert code == 0, err
    data = json.loads(out)
    calls = data["calls"]
    assert data["plan"]["steps"] and set(data["plan"]["sub_agents"]) <= {"retrieval", "processing", "validation", "formatting"}
    assert calls[0]["agent"] == "orchestrator" and calls[-1]["agent"] == "aggregate"
    with CaptureStore.open("sqlite:///.slmswap/slmswap.db") as store:
        summary = store.get_call(calls[-1]["id"]).response["content"] or ""
    # The answer opens with the aggregate model's own words (repeats collapsed), not only the text added after it.
    assert data["answer"].startswith(collapse_repeats(summary.strip()) or "No summary was produced.")
    assert all(c["binding"] == "gguf:smollm2-135m" and c["template_id"] == f"{c['agent']}/base@1" for c in calls)
    assert all(c["tokens"] > 0 for c in calls)
    # Under a grammar the plan and every tool call parse; only text may be cut short.
    assert calls[0]["valid"], calls[0]
    code, out, _ = slmswap(capsys, "calls", "list", "--limit", "100", "--json")
    assert {c["id"] for c in json.loads(out)} == {c["id"] for c in calls}
