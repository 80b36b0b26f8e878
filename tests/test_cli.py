"""The CLI driven in-process through its real entry point (exit codes included), plus one Ctrl-C in a subprocess."""

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cli import main
from tests.conftest import ROOT


def slmswap(capsys, *args):
    old = sys.argv
    sys.argv = ["slmswap", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_json_prints_answer_plan_calls_run_id(capsys, scripted):
    scripted("x").default = "fine"
    code, out, err = slmswap(capsys, "run", "Top products", "--binding", "scripted:x", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= {"answer", "plan", "calls", "run_id"}
    assert data["calls"] and all(set(c) >= {"agent", "binding", "template_id", "latency_ms", "valid"} for c in data["calls"])
    assert data["calls"][0]["agent"] == "orchestrator" and data["calls"][0]["binding"] == "scripted:x"


def test_run_table_and_calls_commands(capsys, scripted):
    scripted("x").default = "fine"
    code, out, _ = slmswap(capsys, "run", "Top products", "--binding", "scripted:x")
    assert code == 0 and "calls of run" in out and "orchestrator/base@1" in out
    code, out, _ = slmswap(capsys, "calls", "list", "--agent", "retrieval", "--json")
    rows = json.loads(out)
    assert code == 0 and rows and {r["agent"] for r in rows} == {"retrieval"}
    code, out, _ = slmswap(capsys, "calls", "show", rows[0]["id"][:8])
    assert code == 0 and json.loads(out)["id"] == rows[0]["id"]
    code, out, _ = slmswap(capsys, "calls", "stats", "--json")
    stats = {s["agent"]: s for s in json.loads(out)}
    assert code == 0 and stats["retrieval"]["calls"] == len(rows) < 20  # all of them listed (limit 20)
    assert stats["retrieval"]["valid_rate"] == sum(r["valid"] for r in rows) / len(rows)


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query_exits_2(capsys, query):
    code, _, err = slmswap(capsys, "run", query)
    assert code == 2 and "query is empty" in err


def test_unknown_binding_exits_2_listing_forms(capsys):
    code, _, err = slmswap(capsys, "run", "hi", "--binding", "gpt4")
    assert code == 2 and "azure:<deployment>" in err and "Traceback" not in err


def test_bad_config_exits_2_with_file_and_line(capsys):
    Path("slmswap.toml").write_text("[workflow]\nmax_turns = 3\n")
    code, _, err = slmswap(capsys, "run", "hi")
    assert code == 2 and "slmswap.toml:2" in err


def test_unwritable_store_fails_before_any_model_loads(capsys, scripted):
    # A store path under a regular file cannot be created, even by root (who ignores permission bits).
    Path("file").write_text("")
    Path("slmswap.toml").write_text('[store]\nurl = "sqlite:///file/calls.db"\n')
    code, _, err = slmswap(capsys, "run", "hi", "--binding", "scripted:x")
    assert code != 0 and "file" in err and ("store.url" in err or "SLMSWAP_STORE" in err)
    assert scripted("x").requests == []


def test_missing_call_id_is_a_clear_error(capsys):
    code, _, err = slmswap(capsys, "calls", "show", "deadbeef")
    assert code == 2 and "deadbeef" in err


CHILD = """
import asyncio, sys
sys.path.insert(0, {root!r})
from tests.support.scripted import scripted
async def slow(req):
    print("call", flush=True)
    await asyncio.sleep(0.3)
    return "slow answer"
scripted("slow").default = lambda req: slow(req)
from app.cli import main
sys.argv = ["slmswap", "run", "Analyze Q4 sales", "--binding", "scripted:slow"]
main()
"""


def test_ctrl_c_during_a_run_leaves_the_store_consistent(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT))], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + 60
    while seen < 3 and time.time() < deadline:
        if proc.stdout.readline().startswith("call"):
            seen += 1
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    db = sqlite3.connect(tmp_path / ".slmswap" / "slmswap.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    (status,) = db.execute("SELECT status FROM runs").fetchone()
    assert status == "interrupted"
    (n,) = db.execute("SELECT COUNT(*) FROM calls").fetchone()
    assert n >= 2  # every call that returned before the interrupt is there
