"""The capture store on real database files: round trips, queries, group commit, redaction on disk, rows that
survive SIGKILL and Ctrl-C of a real subprocess, and a writer that Ctrl-C cannot stall. Parametrised by
`store_url`: every store test runs on SQLite and on PostgreSQL (a throwaway cluster, see tests/support/postgres.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from app.capture.records import CallRecord, TemplateRecord
from app.capture.redact import REDACTED, redact
from app.capture.store import CaptureStore, summarize
from app.errors import StoreError, UsageError

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-live0123456789abcdefXYZ"


@pytest.fixture
def store(store_url):
    with CaptureStore.open(store_url) as s:
        yield s


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def call(**kw) -> CallRecord:
    base = dict(route="retrieval", agent="retrieval", binding="gguf:smollm2-135m",
                request={"messages": [{"role": "user", "content": "hi"}], "tools": None, "tool_choice": None,
                         "response_format": None, "params": {"temperature": 0.0}},
                response={"content": "hello", "tool_calls": None, "finish_reason": "stop"})
    return CallRecord(**base | kw)


@pytest.fixture
def db_locked(request, store_url):
    """`with db_locked():` keeps the writer's commits waiting for the block: SQLite's write lock held from another
    connection (for up to the store's 10 s busy timeout), or on PostgreSQL an EXCLUSIVE lock on `calls`, which
    blocks inserts and lets reads through."""
    @contextmanager
    def locked():
        if store_url.startswith("sqlite"):
            conn = sqlite3.connect(sqlite_path(store_url), isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
        else:
            conn = request.getfixturevalue("postgres").connect(store_url)
            conn.execute("BEGIN")
            conn.execute("LOCK TABLE calls IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()

    return locked


def wait_until_pending(store: CaptureStore, n: int) -> None:
    """Block until `n` writes are queued or committing (not yet acknowledged); no ordering is left to sleeps."""
    deadline = time.monotonic() + 30  # only ever reached when something is broken
    while store._writer.pending < n:
        assert time.monotonic() < deadline, f"{store._writer.pending} of {n} writes were queued"
        time.sleep(0.001)


# ---- round trips and queries ---------------------------------------------------------------------------------

def test_record_round_trips_every_field(store):
    created = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    original = call(run_id="run1", template_id="retrieval/base@1", source="proxy", valid=False,
                    error_type="invalid_tool_call", error_detail="no such tool", latency_ms=12.5, prompt_tokens=30,
                    completion_tokens=7, cost_usd=0.001, teacher_cost_usd=0.02, created_at=created)
    store.record(original)
    got = store.get_call(original.id)
    assert got == CallRecord(**{**{f: getattr(original, f) for f in original.__dataclass_fields__},
                                "created_at": created.astimezone(UTC)})
    assert got.created_at.tzinfo is not None and got.created_at == created


def test_list_calls_newest_first_with_filters(store):
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    rows = [call(agent="a" if i % 2 else "b", run_id="r1" if i < 3 else "r2", created_at=t0 + timedelta(seconds=i))
            for i in range(6)]
    for row in rows:
        store.record(row)
    assert [c.id for c in store.list_calls()] == [r.id for r in reversed(rows)]
    assert [c.id for c in store.list_calls(agent="a")] == [rows[5].id, rows[3].id, rows[1].id]
    assert [c.id for c in store.list_calls(run_id="r1", limit=2)] == [rows[2].id, rows[1].id]
    assert [c.id for c in store.calls_for_run("r2")] == [rows[3].id, rows[4].id, rows[5].id]


def test_get_call_by_unique_prefix(store):
    for cid in ("abc123", "abd456", "abc789"):
        store.record(call(id=cid))
    assert store.get_call("abd").id == "abd456"
    assert store.get_call("abc789").id == "abc789"
    with pytest.raises(UsageError, match="more than one call.*more characters"):
        store.get_call("abc")
    with pytest.raises(UsageError, match="slmswap calls list"):
        store.get_call("zzz")
    with pytest.raises(UsageError):
        store.get_call("")


def test_get_call_prefix_is_literal(store):
    store.record(call(id="a_c1"))
    store.record(call(id="abc2"))
    assert store.get_call("a_").id == "a_c1"  # "_" is not a LIKE wildcard here
    with pytest.raises(UsageError):
        store.get_call("a%")


def test_stats_per_agent(store):
    for latency, valid in [(10, True), (30, False), (20, True)]:
        store.record(call(agent="a", latency_ms=latency, valid=valid))
    store.record(call(agent="b", latency_ms=5, valid=True))
    a, b = store.stats()
    assert (a.agent, a.calls, a.p50_latency_ms) == ("a", 3, 20)
    assert a.valid_rate == pytest.approx(2 / 3)
    assert (b.agent, b.calls, b.valid_rate, b.p50_latency_ms) == ("b", 1, 1.0, 5)


def test_summarize_is_pure_and_handles_missing_agent():
    rows = [{"agent": None, "valid": True, "latency_ms": 1.0}, {"agent": None, "valid": False, "latency_ms": 3.0},
            {"agent": "x", "valid": False, "latency_ms": 2.0}]
    none, x = summarize(rows)
    assert (none.agent, none.calls, none.valid_rate, none.p50_latency_ms) == (None, 2, 0.5, 2.0)
    assert (x.agent, x.valid_rate) == ("x", 0.0)


def test_unknown_source_is_refused(store):
    with pytest.raises(UsageError, match="source"):
        store.record(call(source="cli"))


# ---- runs and templates ----------------------------------------------------------------------------------------

def test_run_lifecycle(store):
    run_id = store.start_run("what is 2+2?")
    run = store.get_run(run_id)
    assert (run.status, run.query, run.finished_at) == ("running", "what is 2+2?", None)
    store.finish_run(run_id, "ok", answer="4")
    run = store.get_run(run_id)
    assert (run.status, run.answer) == ("ok", "4")
    assert run.finished_at is not None and run.finished_at.tzinfo is not None  # set by finish_run, not by the clock order
    assert [r.id for r in store.list_runs()] == [run_id]
    assert store.get_run("nope") is None
    with pytest.raises(UsageError, match="start_run"):
        store.finish_run("nope", "failed", error="boom")
    with pytest.raises(UsageError, match="interrupted"):
        store.finish_run(run_id, "running")


def test_templates_add_dedupe_status_and_counts(store):
    base = store.add_template(TemplateRecord(id="retrieval/base@1", route="retrieval", text="You retrieve."))
    assert store.active_template("retrieval") == base and base.content_hash
    # The same text (white space aside) on the same route is the same template: the stored row comes back.
    assert store.add_template(TemplateRecord(id="retrieval/other", route="retrieval", text=" You  retrieve.\n")) == base
    evolved = store.add_template(TemplateRecord(id="retrieval/evolved-1", route="retrieval", origin="evolved",
                                                text="You retrieve. Use tools.", parent_id=base.id))
    store.add_template(TemplateRecord(id="format/base@1", route="format", text="You retrieve."))  # other route
    assert store.active_template("retrieval").id == evolved.id  # the newest live one
    assert store.active_template("nobody") is None
    assert [t.id for t in store.list_templates("retrieval")] == [base.id, evolved.id]
    assert len(store.list_templates()) == 3
    with pytest.raises(UsageError, match="never edited in place"):
        store.add_template(TemplateRecord(id=evolved.id, route="retrieval", text="edited"))

    store.count_template_outcome(evolved.id, success=True)
    store.count_template_outcome(evolved.id, success=True)
    store.count_template_outcome(evolved.id, success=False)
    got = store.get_template(evolved.id)
    assert (got.successes, got.failures, got.trials) == (2, 1, 3)
    retired = store.set_template_status(evolved.id, "retired", "worse")
    assert (retired.status, retired.retired_reason) == ("retired", "worse")
    assert store.active_template("retrieval").id == base.id
    assert [t.id for t in store.list_templates("retrieval", status="live")] == [base.id]
    with pytest.raises(UsageError):
        store.count_template_outcome("missing@1", success=True)
    with pytest.raises(UsageError, match="live"):
        store.set_template_status(base.id, "gone")


# ---- redaction ----------------------------------------------------------------------------------------------

def stored_bytes(request, url: str) -> bytes:
    """Every byte the database holds for this store: the SQLite file and its -wal/-shm, or on PostgreSQL the
    database's own files after a checkpoint (so nothing is left only in shared memory)."""
    if url.startswith("sqlite"):
        db = sqlite_path(url)
        return b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
    cluster = request.getfixturevalue("postgres")
    with cluster.connect(url) as conn:
        conn.execute("CHECKPOINT")
        oid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
    files = (cluster.data / "base" / str(oid)).iterdir()
    return b"".join(p.read_bytes() for p in files if p.is_file())


def test_nothing_secret_reaches_the_disk(store_url, request):
    bearer = "Bearer eyJhbGciOiJIUzI1NiJ9.abc123.def456"
    with CaptureStore.open(store_url) as store:
        store.record(call(
            request={"messages": [{"role": "user", "content": f"my key is {SECRET}"}],
                     "params": {"extra_headers": {"Authorization": bearer, "X-Api-Key": "k-plain-value-1"}},
                     "api_key": "plain-value-2"},
            response={"content": f"echo {bearer}"}, error_detail=f"401 for {SECRET}"))
        run_id = store.start_run(f"use {SECRET}")
        store.finish_run(run_id, "failed", error=f"auth failed: {bearer}")
        got = store.list_calls()[0]
    assert got.request["messages"][0]["content"] == f"my key is {REDACTED}"
    assert got.request["params"]["extra_headers"] == {"Authorization": REDACTED, "X-Api-Key": REDACTED}
    on_disk = stored_bytes(request, store_url)
    assert got.id.encode() in on_disk  # the check below looks where the rows really are
    for secret in (SECRET, "eyJhbGciOiJIUzI1NiJ9", "k-plain-value-1", "plain-value-2"):
        assert secret.encode() not in on_disk


@pytest.mark.parametrize("key", ["api_key", "API-KEY", "Authorization", "x-api-key", "client_secret",
                                 "Password", "AZURE_OPENAI_API_KEY", "apiKey", "proxy-authorization"])
def test_redact_secret_keys(key):
    assert redact({key: "v", "keep": "v"}) == {key: REDACTED, "keep": "v"}


def test_redact_walks_nested_data_and_keeps_the_rest():
    data = {"a": [{"password": "p", "n": 1}, "Bearer abcdefghijklmnop12345"], "max_tokens": 5,
            "prompt_tokens": 3, "note": "the bearer of bad news uses scikit-learn and task-sk-1"}
    assert redact(data) == {"a": [{"password": REDACTED, "n": 1}, REDACTED], "max_tokens": 5, "prompt_tokens": 3,
                            "note": data["note"]}
    assert data["a"][0]["password"] == "p"  # the input is not changed


def test_redact_keeps_tool_schemas_with_secret_named_parameters():
    tool = {"type": "function", "function": {"name": "login", "parameters": {
        "type": "object", "properties": {"password": {"type": "string"}, "api_key": {"type": "string"}},
        "required": ["password"]}}}
    assert redact(tool) == tool


def test_redact_text_in_place():
    assert redact(f"use {SECRET}, then Bearer abc.DEF-123_456~789/xyz= done") == \
        f"use {REDACTED}, then {REDACTED} done"


# ---- group commit and async --------------------------------------------------------------------------------

def test_concurrent_recorders_share_commits(store, db_locked):
    with db_locked():
        # The first commit waits on the lock; everything queued meanwhile must go in one more commit.
        threads = [threading.Thread(target=store.record, args=(call(id=f"c{i}"),)) for i in range(20)]
        for t in threads:
            t.start()
        wait_until_pending(store, 20)
    for t in threads:
        t.join()
    assert len(store.list_calls(limit=100)) == 20
    assert store._writer.commits <= 2 and store._writer.pending == 0


def test_duplicate_id_fails_only_its_caller(store, db_locked):
    store.record(call(id="dup"))
    errors = {}

    def rec(cid):
        try:
            store.record(call(id=cid))
        except StoreError as exc:
            errors[cid] = exc

    with db_locked():
        # "first" holds the writer at the lock, so the other three are queued together and share one batch.
        first = threading.Thread(target=rec, args=("first",))
        first.start()
        wait_until_pending(store, 1)
        threads = [threading.Thread(target=rec, args=(cid,)) for cid in ("x1", "dup", "x2")]
        for t in threads:
            t.start()
        wait_until_pending(store, 4)
    for t in [first, *threads]:
        t.join()
    assert list(errors) == ["dup"] and "already recorded" in str(errors["dup"])
    assert {c.id for c in store.list_calls()} == {"dup", "first", "x1", "x2"}


def test_arecord_does_not_block_the_event_loop(store, db_locked):
    async def main():
        with db_locked():
            # With the database locked no write can commit; a blocking arecord would stall this loop right here
            # (and fail on the busy timeout), instead of handing control back while its write waits.
            writes = [asyncio.create_task(store.arecord(call(id=f"a{i}"))) for i in range(50)]
            await asyncio.sleep(0)
            assert store._writer.pending == 50 and not any(w.done() for w in writes)
        await asyncio.gather(*writes)

    asyncio.run(main())
    assert len(store.list_calls(limit=100)) == 50


def test_arecord_raises_store_errors(store):
    store.record(call(id="same"))
    with pytest.raises(StoreError, match="already recorded"):
        asyncio.run(store.arecord(call(id="same")))


def test_flush_waits_for_other_threads(store, db_locked):
    flushed = threading.Event()
    with db_locked():
        t = threading.Thread(target=store.record, args=(call(id="late"),))
        t.start()
        wait_until_pending(store, 1)
        f = threading.Thread(target=lambda: (store.flush(), flushed.set()))
        f.start()
        wait_until_pending(store, 2)
        assert store.list_calls() == [] and not flushed.is_set()  # "late" cannot commit, so flush cannot return
    f.join()
    assert [c.id for c in store.list_calls()] == ["late"]
    t.join()


# ---- lifecycle and opening --------------------------------------------------------------------------------

def test_close_is_idempotent_and_refuses_writes(store_url):
    store = CaptureStore.open(store_url)
    store.record(call(id="before"))
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.record(call())
    with pytest.raises(StoreError, match="closed"):
        asyncio.run(store.arecord(call()))
    with pytest.raises(StoreError, match="closed"):
        store.start_run("q")
    with CaptureStore.open(store_url) as again:
        assert [c.id for c in again.list_calls()] == ["before"]
    with pytest.raises(StoreError):
        again.record(call())


def test_open_creates_the_directory_and_sets_wal(tmp_path):
    db = tmp_path / "a" / "b" / "calls.db"
    with CaptureStore.open(f"sqlite:///{db}"):
        pass
    assert db.exists()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_unwritable_location_names_path_and_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as err:
        CaptureStore.open(f"sqlite:///{blocker / 'sub' / 'calls.db'}")
    assert str(blocker) in str(err.value) and "SLMSWAP_STORE__URL" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_open_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(StoreError, match="not writable"):
        CaptureStore.open(f"sqlite:///{ro / 'calls.db'}")


def test_open_non_sqlite_file_leaves_it_untouched(tmp_path):
    notes = tmp_path / "notes.db"
    notes.write_bytes(b"these are my notes, not a database\n" * 10)
    before = (notes.read_bytes(), notes.stat().st_mtime_ns)
    with pytest.raises(StoreError, match="not a SQLite database"):
        CaptureStore.open(f"sqlite:///{notes}")
    assert (notes.read_bytes(), notes.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_open_refuses_memory_and_bad_urls():
    with pytest.raises(StoreError, match="file"):
        CaptureStore.open("sqlite://")
    with pytest.raises(UsageError, match="SLMSWAP_STORE__URL"):  # bad input: exit 2
        CaptureStore.open("not a url")


# ---- crashes: real subprocesses --------------------------------------------------------------------------------

RECORDER = """
import os, signal, sys, threading
from app.capture.records import CallRecord
from app.capture.store import CaptureStore

store = CaptureStore.open(sys.argv[1])
mode = sys.argv[2]

def one():
    c = CallRecord(route="r", binding="b", request={"messages": [{"role": "user", "content": "x" * 300}]},
                   response={"content": "y"})
    store.record(c)
    os.write(1, (c.id + "\\n").encode())  # only after record() returned

def burst():
    while True:
        one()

if mode == "kill-self":
    one()
    threads = [threading.Thread(target=lambda: [one() for _ in range(25)]) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    os.kill(os.getpid(), signal.SIGKILL)
else:
    for _ in range(3):
        threading.Thread(target=burst, daemon=True).start()
    burst()
"""


def run_recorder(url: str, mode: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", RECORDER, url, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)


def read_ids(proc: subprocess.Popen, at_least: int) -> list[str]:
    ids = []
    while len(ids) < at_least:
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode()
        ids.append(line.decode().strip())
    return ids


def assert_intact(url: str, ids: list[str]) -> None:
    if url.startswith("sqlite"):  # PostgreSQL's server outlives the killed client, so only SQLite's file can tear
        conn = sqlite3.connect(sqlite_path(url))
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
    with CaptureStore.open(url) as store:
        stored = {c.id for c in store.list_calls(limit=1_000_000)}
    assert set(ids) <= stored


def test_recorded_call_survives_sigkill(store_url):
    proc = run_recorder(store_url, "kill-self")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    ids = out.decode().split()
    assert len(ids) == 101
    assert_intact(store_url, ids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_burst_keeps_every_returned_record(store_url, sig):
    proc = run_recorder(store_url, "burst")
    ids = read_ids(proc, 300)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)  # a hang here would mean Ctrl-C deadlocked the writer
    ids += [line for line in out.decode().split("\n") if len(line) == 32]
    assert proc.returncode != 0
    assert_intact(store_url, ids)


INTERRUPTER = """
import dis, os, sys, threading
from app.capture.records import CallRecord
from app.capture.store import CaptureStore

# CPython runs signal handlers (so Ctrl-C raises KeyboardInterrupt) when a function starts and just after a call
# or a backward jump. Interrupt raises it at the k-th such point of one record() in this thread.
AFTER = {dis.opmap["CALL"], dis.opmap["JUMP_BACKWARD"]}


class Interrupt:
    def __init__(self, k, gate):
        self.k, self.gate, self.seen, self.where, self.last = k, gate, 0, None, {}

    def point(self, frame):
        self.seen += 1
        if self.seen == self.k:
            self.where = frame.f_code.co_name
            self.gate.set()  # the writer goes on only after the interrupt: the order that can hurt
            raise KeyboardInterrupt

    def trace(self, frame, event, arg):
        if self.where is None:
            frame.f_trace_lines, frame.f_trace_opcodes = False, True
            self.last[id(frame)] = None
            self.point(frame)
        return self.local

    def local(self, frame, event, arg):
        if event == "opcode" and self.where is None:
            op, prev = frame.f_code.co_code[frame.f_lasti], self.last.get(id(frame))
            self.last[id(frame)] = op
            if prev in AFTER:
                self.point(frame)
        return self.local

    def profile(self, frame, event, arg):
        # About to block on a held lock (the caller's wait): let the writer commit, or nobody would wake it.
        held = getattr(getattr(arg, "__self__", None), "locked", None)
        if event == "c_call" and getattr(arg, "__name__", "") == "acquire" and callable(held) and held():
            self.gate.set()


store = CaptureStore.open(sys.argv[1])
gate = threading.Event()
run = store._writer._insert.run
store._writer._insert.run = lambda conn, params, then=(): (gate.wait(), run(conn, params, then))
k, places = 0, set()
while True:
    k += 1
    gate.clear()
    interrupt = Interrupt(k, gate)
    sys.setprofile(interrupt.profile)
    sys.settrace(interrupt.trace)
    try:
        store.record(CallRecord(route="r", binding="b", request={"messages": []}, response={"content": "y"}))
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    gate.set()
    if interrupt.where is None:
        break  # record() ran to its end: every point has been tried
    places.add(interrupt.where)
    flush = threading.Thread(target=store.flush, daemon=True)
    flush.start()
    flush.join(60)  # only a stalled writer takes this long
    if flush.is_alive():
        print(f"the writer stalled after Ctrl-C at point {k}, in {interrupt.where}", flush=True)
        os._exit(3)
print(k - 1, " ".join(sorted(places)), flush=True)
store.close()
"""


def test_ctrl_c_at_any_point_of_record_never_stalls_the_writer(store_url):
    # Each run of the sweep raises KeyboardInterrupt at the next point of record() where a real Ctrl-C could land,
    # holding the writer back until it has, then checks that the writer still commits (and close() can finish).
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", INTERRUPTER, store_url], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    points, *places = out.stdout.split()
    assert int(points) > 100 and {"record", "write", "_submit"} <= set(places)  # it reached into the wait


def test_unserializable_call_fails_alone(store):
    with pytest.raises(StoreError, match="not JSON.*request_payload"):
        store.record(call(request={"messages": [object()]}))
    store.record(call(id="fine"))
    assert [c.id for c in store.list_calls()] == ["fine"]


def test_redact_quick_check_covers_every_secret_word():
    from app.capture import redact as module

    for word in module._SECRET_WORDS:
        assert any(needle in word.replace("_", "-") and needle in word for needle in module._NEEDLES[2:]), word
    for key in ("API-KEY", "Refresh-Token", "x-Auth-Token", "PASSWD"):  # each found both ways
        assert module.is_secret_key(key) and module._might_hold_secret({key: 1})


def test_redact_quick_check_never_changes_the_result():
    import random

    from app.capture import redact as module

    rng = random.Random(7)
    keys = ["role", "content", "X-Api-Key", "client_SECRET", "properties", "max_tokens", "Access-Token", "name",
            "passWord", "auth", "k"]
    texts = ["hello", f"use {SECRET}", "Bearer abcdef0123456789xyz", "the bearer of news", "sk-short", "tokens"]

    def gen(depth):
        roll = rng.random()
        if depth > 3 or roll < 0.3:
            return rng.choice(texts + [1, 2.5, None, True])
        if roll < 0.5:
            return [gen(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys): gen(depth + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(500):
        value = gen(0)
        assert redact(value) == module._walk(value, schema_properties=False)


def test_a_forked_child_gets_an_error_not_a_hang(store):
    pid = os.fork()
    if pid == 0:  # child: the writer thread did not survive the fork
        try:
            store.record(call())
            code = 1
        except StoreError:
            code = 0
        store.close()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.record(call(id="parent"))  # the parent's store is unharmed
    assert [c.id for c in store.list_calls()] == ["parent"]


def test_open_corrupt_sqlite_file_is_a_store_error(tmp_path):
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    with pytest.raises(StoreError, match="cannot open the capture store"):
        CaptureStore.open(f"sqlite:///{broken}")


def test_open_without_a_driver_names_the_install(monkeypatch):
    from app.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "pg8000", None)  # as if not installed, whatever this machine has
    hint = r"pip install 'psycopg\[binary\]' and use postgresql\+psycopg://"
    with pytest.raises(MissingDependency, match=hint) as err:
        CaptureStore.open("postgresql+pg8000://user:pw@localhost/slmswap")
    assert "pw" not in str(err.value)


def test_payloads_from_wire_types_round_trip(store):
    from app.capture.records import request_payload, response_payload
    from app.wire import AssistantMessage, ChatRequest, ChatResponse, Choice, FunctionCall, ToolCall

    req = ChatRequest.model_validate({
        "model": "retrieval", "messages": [{"role": "user", "content": "find x"}], "temperature": 0.2,
        "max_tokens": 64, "tool_choice": "auto", "metadata": {"run_id": "r1"}, "stream": False,
        "tools": [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]})
    resp = ChatResponse(choices=[Choice(finish_reason="tool_calls", message=AssistantMessage(tool_calls=[
        ToolCall(id="call_1", function=FunctionCall(name="search", arguments='{"q": "x"}'))]))])
    request, response = request_payload(req), response_payload(resp)
    assert request == {"messages": [{"role": "user", "content": "find x"}],
                       "tools": [{"type": "function", "function": {"name": "search",
                                                                   "parameters": {"type": "object"}}}],
                       "tool_choice": "auto", "response_format": None,
                       "params": {"temperature": 0.2, "max_tokens": 64}}
    assert response == {"content": None, "finish_reason": "tool_calls", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}]}
    store.record(call(id="wire", request=request, response=response))
    got = store.get_call("wire")
    assert (got.request, got.response) == (request, response)


# ---- PostgreSQL: a server that restarts ------------------------------------------------------------------------

def test_the_writer_reconnects_after_the_database_restarts(postgres, postgres_url):
    with CaptureStore.open(postgres_url) as store:
        store.record(call(id="before"))
        postgres.restart()  # cuts every connection, the writer's included
        store.record(call(id="after"))
        assert store._writer.reconnects == 1  # the first commit did find its connection cut
        run_id = store.start_run("after a restart")  # the pooled connections are replaced too
        assert {c.id for c in store.list_calls()} == {"before", "after"}
        assert store.get_run(run_id).status == "running"


def test_a_database_that_stays_away_fails_the_call_and_the_writer_recovers(postgres, postgres_url):
    with CaptureStore.open(postgres_url) as store:
        store.record(call(id="before"))
        store._writer._reconnect_delays = (0, 0)  # give up at once: the server is stopped until we restart it
        postgres.stop_server()
        try:
            with pytest.raises(StoreError, match="(?s)could not record call lost.*its server.*SLMSWAP_STORE__URL"):
                store.record(call(id="lost"))
        finally:
            postgres.start_server()
        store.record(call(id="after"))
        assert {c.id for c in store.list_calls()} == {"before", "after"}


def test_recorders_running_through_a_restart_lose_nothing(postgres, postgres_url):
    # Four threads record without pause while the server restarts under them: every record() that returned is
    # stored, and none fails (the restart takes far less than the writer's reconnect budget).
    ids, errors, stop = [], [], threading.Event()

    def recorder(store):
        while not stop.is_set():
            c = call()
            try:
                store.record(c)
            except StoreError as exc:
                errors.append(exc)
                return
            ids.append(c.id)

    def recorded_at_least(n):
        deadline = time.monotonic() + 60  # only reached when recording has stopped
        while len(ids) < n and not errors:
            assert time.monotonic() < deadline, f"{len(ids)} of {n} calls were recorded"
            time.sleep(0.005)

    with CaptureStore.open(postgres_url) as store:
        threads = [threading.Thread(target=recorder, args=(store,)) for _ in range(4)]
        for t in threads:
            t.start()
        recorded_at_least(50)
        postgres.restart()
        after = len(ids)
        recorded_at_least(after + 50)
        stop.set()
        for t in threads:
            t.join()
        assert errors == [] and store._writer.reconnects >= 1
        assert set(ids) <= {c.id for c in store.list_calls(limit=1_000_000)}
