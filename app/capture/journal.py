"""The capture journal: a call is durable against `kill -9` once one os.write() has put it in a local file.

Waiting for the database's commit on every answered request costs the proxy more than anything else it does in
front of a fast upstream. Instead the record is appended to an append-only segment file with a single write
before the response goes out: the bytes are then in the kernel's page cache, which outlives the process (not a
power cut, the same promise as SQLite's `synchronous=NORMAL`). The group-commit writer (`writer.py`) moves the
rows into the store in batches as before; once every row of a segment is committed the segment is emptied (or,
when sealed, deleted). A segment whose process died is replayed into the store by the next process that opens
it, idempotently: rows whose call id is already stored are skipped.

Each live process holds an exclusive `flock` on its own segments, so a replayer never takes one that its owner
is still writing (several uvicorn workers, the CLI beside a server), and two replayers never take the same one.
Rows the store refused (a database away longer than the writer's reconnects) stay in their segment, which is
closed at exit and replayed at the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine

log = logging.getLogger("slmswap.capture")
ROTATE_BYTES = 16 * 1024 * 1024  # a segment that grows past this under load is sealed and a new one begun
SUFFIX = ".jsonl"


def default_directory(engine: Engine) -> Path | None:
    """Where a store's journal lives: beside a SQLite file, else under .slmswap/ named after the store's URL (so
    two stores never share one); None for an in-memory SQLite database (nothing there outlives the process)."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            return None
        path = Path(database).expanduser().absolute()
        return path.with_name(path.name + ".capture-journal")
    digest = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:12]
    return Path(".slmswap").absolute() / f"capture-journal-{digest}"


class Segment:
    """One journal file of this process: its descriptor (flocked), size and rows not yet committed."""

    __slots__ = ("path", "fd", "size", "outstanding", "dirty", "sealed")

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd
        self.size = self.outstanding = 0
        self.dirty = self.sealed = False  # dirty: a row of it was refused by the store, so it is kept for replay


class Journal:
    """This process's journal: `append` a row (one write), `settled` once the writer has committed it."""

    def __init__(self, directory: Path, rotate_bytes: int = ROTATE_BYTES):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self._rotate_bytes = directory, rotate_bytes
        self._lock = threading.Lock()
        self._closed = False
        self._current = self._new_segment()

    def append(self, row: dict[str, Any]) -> Segment:
        """Write `row` as one line with one os.write(); durable against this process dying when it returns."""
        line = encode(row)
        with self._lock:
            if self._closed:
                raise OSError("the capture journal is closed")
            segment = self._current
            view = memoryview(line)
            while view:  # a regular file takes the whole line at once unless the disk is full
                view = view[os.write(segment.fd, view):]
            segment.size += len(line)
            segment.outstanding += 1
        return segment

    def settled(self, segment: Segment, committed: bool) -> None:
        """The writer's word on one row of `segment`: committed, or refused (then the segment is kept)."""
        with self._lock:
            segment.outstanding -= 1
            segment.dirty |= not committed
            if segment is self._current and not self._closed:
                if segment.outstanding == 0 and not segment.dirty:
                    if segment.size:  # everything in it is in the store: start it over (O_APPEND follows)
                        os.ftruncate(segment.fd, 0)
                        segment.size = 0
                elif segment.dirty or segment.size >= self._rotate_bytes:
                    self._current = self._new_segment()
                    segment.sealed = True
            if segment.sealed and segment.outstanding == 0:
                self._retire(segment)

    def close(self) -> None:
        """At exit, after the writer committed what it could: a clean segment is deleted, a dirty one kept."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._retire(self._current)
        with contextlib.suppress(OSError):  # only when empty: another process's segments or a kept one stay
            self.directory.rmdir()

    def _retire(self, segment: Segment) -> None:
        if segment.fd < 0:
            return
        if segment.outstanding == 0 and not segment.dirty:
            with contextlib.suppress(OSError):
                segment.path.unlink()
        os.close(segment.fd)  # releases the flock: a kept segment is anyone's to replay now
        segment.fd = -1

    def _new_segment(self) -> Segment:
        path = self.directory / f"calls-{os.getpid()}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # new and uniquely named: nobody else holds it
        return Segment(path, fd)


def encode(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, option=orjson.OPT_NON_STR_KEYS) + b"\n"


def orphans(directory: Path | None) -> Iterator[tuple[Path, list[dict[str, Any]], int]]:
    """The segments in `directory` whose process is gone, each as (path, rows, unreadable lines), locked while
    the caller handles it; the caller deletes one it has replayed (`path.unlink()`) before asking for the next."""
    if directory is None or not directory.is_dir():
        return
    for path in sorted(directory.glob(f"calls-*{SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # replayed by another process just now
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive, or another replayer has it
                continue
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue
            except FileNotFoundError:  # replayed and deleted between our open and our lock
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            rows, bad = decode(data)
            yield path, rows, bad
        finally:
            os.close(fd)


def decode(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The rows of a segment, and how many lines could not be read (a write cut short by a full disk)."""
    rows, bad = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def revive(row: dict[str, Any], datetime_keys: frozenset[str]) -> dict[str, Any]:
    """A decoded row with its datetimes back (orjson wrote them as ISO 8601 strings)."""
    for key in datetime_keys:
        value = row.get(key)
        if isinstance(value, str):
            row[key] = datetime.fromisoformat(value)
    return row
