"""The whole workflow with every route bound to llama-cpp-python's own OpenAI server (SmolLM2 on loopback), which
rejects `response_format: json_schema` and asserts `tool_choice == "auto"`: the backend learns that and degrades."""

import json
import logging
import os
import subprocess
import sys

import pytest

from app.capture.store import CaptureStore
from app.local_models import resolve_model
from tests.support.http import free_port, wait_until_up
from tests.support.requires import require
from tests.test_cli import slmswap

require("llama_cpp")
require("starlette_context")  # llama-cpp-python[server]'s extras: pip install -e '.[dev]'

pytestmark = pytest.mark.slow
START_S = 120  # bound on the server's start; it loads a 100 MB model


@pytest.fixture
def llamacpp_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "llama_cpp.server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_model("smollm2-135m")), "--chat_format",
         "chatml-function-calling", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
         "--n_threads", str(min(2, os.cpu_count() or 1))],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", proc, "llama_cpp.server",
                      (tmp_path / "llama_cpp.server.log").read_text, START_S)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_workflow_on_llamacpp_server_degrades_and_every_call_is_valid(llamacpp_server, capsys, monkeypatch, caplog):
    monkeypatch.setenv("SLMSWAP_WORKFLOW__MAX_TOKENS", "64")
    monkeypatch.setenv("SLMSWAP_WORKFLOW__MAX_TOOL_TURNS", "1")
    monkeypatch.setenv("SLMSWAP_WORKFLOW__MAX_RETRIES", "0")
    caplog.set_level(logging.WARNING, logger="app.backends.openai_compat")
    code, out, err = slmswap(capsys, "run", "Analyze Q4 sales by region and write a short report", "--json",
                             "--binding", f"openai:smollm2?base_url={llamacpp_server}&max_retries=0&timeout=300")
    assert code == 0, err
    data = json.loads(out)
    calls = data["calls"]
    assert data["answer"].strip()
    assert calls[0]["agent"] == "orchestrator" and calls[-1]["agent"] == "aggregate"
    assert all(c["binding"] == "openai:smollm2" for c in calls)
    with CaptureStore.open("sqlite:///.slmswap/slmswap.db") as store:
        records = [store.get_call(c["id"]) for c in calls]
    invalid = [(r.agent, r.error_type, r.error_detail, r.request.get("tool_choice"), r.response) for r in records
               if not r.valid]
    assert not invalid, invalid
    # The plan was asked for as json_schema and sub-agents' first turns as tool_choice "required": both were
    # refused by this server, learned once each, and answered degraded.
    assert records[0].request["response_format"]["type"] == "json_schema"
    assert any(r.request.get("tool_choice") == "required" for r in records)
    learned = [r.getMessage() for r in caplog.records if "does not support" in r.getMessage()]
    assert sum("json_schema" in m for m in learned) == 1 and sum("'required'" in m for m in learned) == 1, learned
