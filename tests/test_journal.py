"""The capture journal: a journaled call survives `kill -9` of its process before any commit, is replayed once
(idempotently) by the next process to open the store, and a live process's journal is never taken from it.
Parametrised by `store_url` (SQLite and PostgreSQL) like the store's own tests."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.capture.journal import Journal, default_directory, encode
from app.capture.records import CallRecord
from app.capture.store import CaptureStore, _call_row
from tests.conftest import ROOT

JOURNALER = """
import asyncio, sys
from app.capture.records import CallRecord
from app.capture.store import CaptureStore

store = CaptureStore.open(sys.argv[1])
n = int(sys.argv[2])

async def main():
    for i in range(n):
        await store.arecord_durable(CallRecord(id=f"j{i}", route="r", binding="b", request={"messages": []},
                                               response={"content": f"answer {i}"}))
    # every call has returned, none can have committed (the test holds the database's write lock)
    print("journaled", store._writer.commits, flush=True)

asyncio.run(main())
sys.stdin.readline()  # wait here to be killed
"""


def call(**kw) -> CallRecord:
    return CallRecord(**dict(route="r", binding="b", request={"messages": []}, response={"content": "x"}) | kw)


@pytest.fixture
def write_locked(request, store_url):
    """`with write_locked():` no commit to `calls` can happen meanwhile (reads still can)."""
    @contextmanager
    def locked():
        if store_url.startswith("sqlite"):
            conn = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
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


def segments(store: CaptureStore) -> list[Path]:
    directory = default_directory(store._engine)
    return sorted(directory.glob("calls-*.jsonl")) if directory.is_dir() else []


def test_a_journaled_call_survives_kill_9_before_any_commit(store_url, write_locked):
    CaptureStore.open(store_url).close()  # create the tables before the lock is taken
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    with write_locked():
        child = subprocess.Popen([sys.executable, "-c", JOURNALER, store_url, "25"], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line.split() == ["journaled", "0"], line + child.stderr.read()[-2000:]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
    with CaptureStore.open(store_url) as store:
        assert store._writer.replayed == 25
        stored = {c.id: c for c in store.list_calls(limit=100)}
        assert set(stored) == {f"j{i}" for i in range(25)}
        assert stored["j7"].response == {"content": "answer 7"} and stored["j7"].created_at.tzinfo is not None
    with CaptureStore.open(store_url) as again:  # replayed once: the segment is gone
        assert again._writer.replayed == 0 and len(again.list_calls(limit=100)) == 25


def test_replay_skips_calls_already_stored(store_url):
    with CaptureStore.open(store_url) as store:
        store.record(call(id="kept", response={"content": "original"}))
        directory = default_directory(store._engine)
    # What a process killed between a commit and emptying its segment leaves: a stored call and a new one.
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "calls-1-dead.jsonl").write_bytes(
        encode(_call_row(call(id="kept", response={"content": "replayed"}))) + encode(_call_row(call(id="new"))))
    with CaptureStore.open(store_url) as store:
        assert store._writer.replayed == 2
        assert {c.id: c.response["content"] for c in store.list_calls()} == {"kept": "original", "new": "x"}
    assert not directory.exists()  # nothing left: the empty journal folder goes at close


def test_a_live_process_journal_is_not_replayed(store_url):
    with CaptureStore.open(store_url) as store:
        directory = default_directory(store._engine)
    live = Journal(directory)  # as another running process would hold it (flocked)
    live.append(_call_row(call(id="in-flight")))
    try:
        with CaptureStore.open(store_url) as store:
            assert store._writer.replayed == 0 and store.list_calls() == []
        assert live._current.path.exists()
    finally:
        live.close()  # not committed, so kept: the next start replays it
    with CaptureStore.open(store_url) as store:
        assert [c.id for c in store.list_calls()] == ["in-flight"]


def test_journaled_calls_are_read_back_at_once_and_leave_no_journal(store_url):
    with CaptureStore.open(store_url) as store:
        async def main():
            for i in range(10):
                await store.arecord_durable(call(id=f"c{i}"))

        asyncio.run(main())
        assert len(store.list_calls()) == 10  # a reader in this process waits for its journaled calls
        assert store._writer.journaled == 0
        directory = default_directory(store._engine)
        assert all(p.stat().st_size == 0 for p in segments(store))  # all committed: emptied
    assert not directory.exists()


def test_rows_the_store_refused_stay_journaled_for_the_next_start(tmp_path):
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    store = CaptureStore.open(url)
    store.record(call(id="dup"))

    async def main():
        await store.arecord_durable(call(id="dup"))  # refused at commit (the id is taken); nobody is waiting
        await store.arecord_durable(call(id="fine"))

    asyncio.run(main())
    store.flush()
    store.close()
    kept = sorted((tmp_path / "calls.db.capture-journal").glob("calls-*.jsonl"))
    assert len(kept) == 1 and b'"dup"' in kept[0].read_bytes()  # kept, not lost
    with CaptureStore.open(url) as again:
        assert sorted(c.id for c in again.list_calls()) == ["dup", "fine"]
    assert not (tmp_path / "calls.db.capture-journal").exists()



def test_journaled_calls_wake_the_writer_once_and_share_one_commit(store_url, monkeypatch):
    # Nobody waits for a journaled call, so the writer is not woken for each one (a thread switch on the request
    # path): it lingers, and a reader's barrier (or close) takes every journaled row at once.
    from app.capture import writer as writer_mod

    monkeypatch.setattr(writer_mod, "JOURNAL_LINGER_S", 600.0)  # lingering would outlast the test: only the barrier ends it
    with CaptureStore.open(store_url) as store:
        writer = store._writer
        before = writer.commits

        async def main():
            for i in range(20):
                await store.arecord_durable(call(id=f"l{i}"))

        asyncio.run(main())
        assert writer._queue.qsize() <= 1  # one wake-up queued (or already taken) for all twenty
        store.flush()
        assert writer.commits - before == 1 and writer.journaled == 0
        assert len(store.list_calls(limit=100)) == 20
        asyncio.run(store.arecord_durable(call(id="at-close")))  # close commits it while the writer lingers
    with CaptureStore.open(store_url) as again:
        assert "at-close" in {c.id for c in again.list_calls(limit=100)}


def test_journaled_calls_are_committed_without_any_reader(store_url, monkeypatch):
    from app.capture import writer as writer_mod

    monkeypatch.setattr(writer_mod, "JOURNAL_LINGER_S", 0.01)
    with CaptureStore.open(store_url) as store:
        asyncio.run(store.arecord_durable(call(id="alone")))
        deadline = time.monotonic() + 120  # a bound for a stalled machine, not a measurement
        while store._writer.journaled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store._writer.journaled == 0  # the writer committed it on its own, no barrier asked
