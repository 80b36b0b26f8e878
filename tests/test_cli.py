"""The CLI driven in-process through its real entry point (exit codes included), plus one Ctrl-C in a subprocess."""

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.cli import slmswap




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


@pytest.mark.parametrize("args, shown", [
    (["run", "hi", "--binding", "gguf:[/x]"], "GGUF model file not found: [/x]"),
    (["run", "hi", "--config", "[/x].toml"], "config file [/x].toml does not exist"),
    (["calls", "show", "[/x][red]"], "'[/x][red]'"),
])
def test_error_text_is_printed_literally_never_as_markup(capsys, args, shown):
    code, _, err = slmswap(capsys, *args)
    assert code == 2 and shown in err and "Traceback" not in err


def test_error_text_is_redacted(capsys):
    key = "sk-" + "a1b2c3d4" * 4
    code, _, err = slmswap(capsys, "run", "hi", "--binding", f"gguf:{key}.gguf")
    assert code == 2 and "GGUF model file not found" in err and key not in err


def test_tables_print_user_text_literally(capsys, scripted):
    scripted("[/x]").default = "fine"
    code, out, err = slmswap(capsys, "run", "Top products", "--binding", "scripted:[/x]")
    assert code == 0, err
    assert "scripted:[/x]" in out
    code, out, _ = slmswap(capsys, "calls", "list")
    assert code == 0 and "scripted:[/x]" in out


@pytest.mark.parametrize("url, shown, absent", [
    ("postgresql://u@127.0.0.1/db", "pip install 'psycopg[binary]'", "pymysql"),
    ("mysql://u@127.0.0.1/db", "pip install pymysql", "psycopg"),
    ("not a url at all", "does not parse", "psycopg"),
    ("nosuchdb://u@127.0.0.1/db", "'nosuchdb' is no database", "pip install"),
])
def test_bad_store_url_exits_2_with_a_hint_for_its_scheme(capsys, scripted, monkeypatch, url, shown, absent):
    for driver in ("psycopg2", "psycopg", "pymysql", "MySQLdb"):  # as if no driver were installed
        monkeypatch.setitem(sys.modules, driver, None)
    Path("slmswap.toml").write_text(f'[store]\nurl = "{url}"\n')
    code, _, err = slmswap(capsys, "calls", "list")
    assert code == 2 and shown in err and absent not in err and "SLMSWAP_STORE__URL" in err, err


def test_query_that_is_not_utf8_exits_2_naming_the_argument(capsys):
    query = b"caf\xe9 sales".decode("utf-8", "surrogateescape")  # how Linux hands over invalid bytes in argv
    code, _, err = slmswap(capsys, "run", query)
    assert code == 2 and "argument 2 ('caf\\\\xe9 sales') is not valid UTF-8" in err, err
    assert not Path(".slmswap").exists()  # refused before anything was opened


def test_config_that_is_not_utf8_exits_2_naming_file_and_line(capsys):
    Path("slmswap.toml").write_bytes(b'[workflow]\nmax_retries = 1\n# \xff\n')
    code, _, err = slmswap(capsys, "run", "hi")
    assert code == 2 and "slmswap.toml:3: byte 0xff" in err and "Traceback" not in err


def test_suite_that_is_not_utf8_exits_2_naming_file_and_line(capsys, scripted):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}], "expected": {"content": "hi"}})
    Path("s.jsonl").write_bytes(good.encode() + b"\n" + b'{"messages": "\xe9"}\n')
    code, _, err = slmswap(capsys, "eval", "--suite", "jsonl:s.jsonl", "--model", "scripted:m", "--out", "o")
    assert code == 2 and "s.jsonl:2: byte 0xe9" in err, err


def test_misspelt_environment_variable_is_warned_about(capsys, monkeypatch):
    monkeypatch.setenv("SLMSWAP_STORE_URL", "sqlite:///other.db")
    code, _, err = slmswap(capsys, "calls", "list")
    assert code == 0
    assert "warning: SLMSWAP_STORE_URL matches no setting and is ignored; did you mean SLMSWAP_STORE__URL?" in err


# The child's retrieval model says "ready" and then waits on an event nothing sets: the signal always lands
# mid-run, after the orchestrator's call returned (and was recorded), whatever the machine's speed.
CHILD = """
import asyncio, sys
sys.path.insert(0, {root!r})
from tests.support.scripted import scripted
async def block(req):
    print("ready", flush=True)
    await asyncio.Event().wait()
scripted("orch").enqueue({plan!r})
scripted("block").default = block
from app.cli import main
sys.argv = ["slmswap", "run", "Analyze Q4 sales"]
main()
"""
PLAN = json.dumps({"sub_agents": ["retrieval"], "parallel": False, "aggregation_strategy": "report",
                   "steps": [{"tasks": [{"agent": "retrieval", "task": "get the Q4 sales"}]}]})


def start_blocked_run(tmp_path) -> subprocess.Popen:
    """A `slmswap run` child process, returned once its run is blocked inside the retrieval agent's call."""
    Path(tmp_path, "slmswap.toml").write_text('default_binding = "scripted:orch"\n'
                                              '[routes.retrieval]\nteacher = "scripted:block"\n')
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), plan=PLAN)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the child is inside the call (or has exited: "")
    if line != "ready\n":
        proc.kill()
        pytest.fail(f"the child never reached the blocking call: {line!r} {proc.communicate()}")
    return proc


@pytest.mark.parametrize("sig, code, error", [(signal.SIGINT, 130, "interrupted by the user"),
                                              (signal.SIGTERM, 143, "terminated by SIGTERM")])
def test_signal_during_a_run_marks_it_interrupted_and_keeps_the_store_consistent(tmp_path, sig, code, error):
    proc = start_blocked_run(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)  # a safety net against a hang, not a wait for ordering
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"error: {error}" in err
    db = sqlite3.connect(tmp_path / ".slmswap" / "slmswap.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT status, error FROM runs").fetchall() == [("interrupted", error)]
    agents = [a for (a,) in db.execute("SELECT agent FROM calls ORDER BY created_at")]
    assert agents[0] == "orchestrator"  # the call that returned before the signal is there


def test_run_whose_process_was_killed_shows_as_died(tmp_path, capsys):
    proc = start_blocked_run(tmp_path)
    proc.kill()  # SIGKILL: nothing in the child runs, the row stays "running"
    proc.communicate(timeout=120)
    code, out, _ = slmswap(capsys, "runs", "list", "--json")
    assert code == 0 and [(r["status"], r["pid"]) for r in json.loads(out)] == [("died", proc.pid)]
    db = sqlite3.connect(tmp_path / ".slmswap" / "slmswap.db")
    assert db.execute("SELECT status FROM runs").fetchall() == [("running",)]  # history is not rewritten
    code, out, _ = slmswap(capsys, "runs", "list")
    assert code == 0 and "died" in out
