"""Group commit: one writer thread drains a queue and inserts everything queued in one transaction.

A caller waits (or awaits) until the transaction holding its row has committed, so a write is durable when it
returns; callers who arrive while a commit is under way share the next one, which is what makes many
concurrent recorders cheap. The INSERT is compiled once and run on the writer's own DBAPI connection, because
SQLAlchemy's per-execute bookkeeping costs more than SQLite's insert itself. A KeyboardInterrupt reaches only
the caller's thread, never the writer's, and a batch is one transaction, so no batch is ever half written.
Waking a caller never blocks the writer, wherever Ctrl-C left that caller (see `_Ticket`). On a database server
the writer outlives a restart: a batch whose connection was cut is committed again on a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, Table
from sqlalchemy.exc import DBAPIError

from app.errors import StoreError

Row = dict[str, Any]
FollowUps = list[tuple[str, list]] | tuple  # statements a batch runs after its INSERT, in its transaction
_STOP = object()
# Seconds to wait before each new attempt when a batch finds its connection gone: about 30 s in all, longer than a
# PostgreSQL restart or failover takes; after that the batch's callers get the error.
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1, 2, 2, 4, 4, 8, 8)


class CompiledInsert:
    """An INSERT of whole rows into `table`, compiled once for the engine's dialect."""

    def __init__(self, engine: Engine, table: Table):
        dialect = engine.dialect
        compiled = table.insert().compile(dialect=dialect)
        self.sql = compiled.string
        self._keys = list(compiled.positiontup) if compiled.positional else None
        self._processors = {c.key: c.type.dialect_impl(dialect).bind_processor(dialect) for c in table.columns}
        # The sqlite3 connection is in autocommit mode (see engine.py), so a batch opens its own transaction.
        self._begin = "BEGIN" if dialect.name == "sqlite" else None
        self._engine = engine
        self.integrity_error = dialect.loaded_dbapi.IntegrityError
        self._server = dialect.name != "sqlite"  # a SQLite file has no connection that a restart could cut

    def connect(self):
        return self._engine.raw_connection()

    def is_disconnect(self, exc: BaseException, conn) -> bool:
        """True when `exc` means the server is away or cut `conn` (None: connecting failed): worth a retry."""
        if not self._server:
            return False
        if conn is None:  # could not connect: the server is still starting, or away
            return isinstance(exc, (DBAPIError, self._engine.dialect.loaded_dbapi.Error))
        return self._engine.dialect.is_disconnect(exc, conn.dbapi_connection, None)

    def params(self, row: Row) -> tuple | dict:
        """The row as DBAPI parameters (JSON serialized, datetimes formatted); raises on unserializable data."""
        procs = self._processors
        values = {k: (procs[k](v) if procs[k] else v) for k, v in row.items()}
        return tuple(values[k] for k in self._keys) if self._keys is not None else values

    def run(self, dbapi_conn, params: list, then: FollowUps = ()) -> None:
        """Insert rows (as `params`) in one transaction on a DBAPI connection, then run the `then` statements
        (sql, parameter list) in the same transaction; rolled back entirely on error."""
        cur = dbapi_conn.cursor()
        try:
            if self._begin:
                cur.execute(self._begin)
            cur.executemany(self.sql, params)
            for sql, more in then:
                if more:
                    cur.executemany(sql, more)
            dbapi_conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # on a cut connection this fails too; report the first error
                dbapi_conn.rollback()
            raise
        finally:
            with contextlib.suppress(Exception):
                cur.close()


class _Ticket:
    """One queued row and its waiting caller: a thread's held lock or a coroutine's Future.

    A thread waits by acquiring `done`, a lock taken when the ticket is made, and the writer wakes it with a
    release, which never blocks. A threading.Event would not do: its Python-level `with self._cond` can take
    the condition's lock and then raise KeyboardInterrupt before the block is entered, leaving the lock held
    forever, so the writer's `event.set()` hung, and with it every later commit and `close()` at exit.
    """

    __slots__ = ("row", "params", "error", "done", "future")

    def __init__(self, row: Row | None, params, future: asyncio.Future | None = None):
        self.row, self.params, self.future = row, params, future
        self.done = None if future is not None else _held_lock()
        self.error: BaseException | None = None


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


class GroupCommitWriter:
    """Writes rows through one background thread; `write` returns once the row is committed."""

    def __init__(self, insert: CompiledInsert, *, describe: Callable[[Row, BaseException], str], max_batch=2000,
                 reconnect_delays: tuple[float, ...] = RECONNECT_DELAYS,
                 then: Callable[[list[Row]], FollowUps] | None = None):
        self._insert = insert
        self._then = then  # the statements a batch of rows implies (the template counts its calls move)
        self._reconnect_delays = reconnect_delays
        self._conn = None  # the writer's own connection, opened on the first batch and again after a cut
        self._describe = describe  # turns a failed row into a message for the caller
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self.commits = 0  # transactions committed, for tests and the bench
        self.reconnects = 0  # connections replaced after a cut, for tests
        self.pending = 0  # tickets queued or being committed whose callers are not yet woken, for tests
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    def write(self, row: Row | None) -> None:
        """Queue `row` and block until it is committed (None: until everything queued before is)."""
        ticket = self._submit(row)
        ticket.done.acquire()
        if ticket.error is not None:
            raise ticket.error

    def submit(self, row: Row) -> None:
        """Queue `row` for the next commit without waiting for it (nobody may be left to wait: an aborted call)."""
        self._submit(row)  # its lock is released by the writer and never acquired: nobody waits

    async def awrite(self, row: Row | None) -> None:
        """`write` without blocking the event loop."""
        ticket = self._submit(row, future=asyncio.get_running_loop().create_future())
        await ticket.future
        if ticket.error is not None:
            raise ticket.error

    def close(self) -> None:
        """Commit everything queued, then stop the thread. Idempotent."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _submit(self, row: Row | None, future: asyncio.Future | None = None) -> _Ticket:
        # Serialize here, on the caller's thread: bad data fails its own caller, never the batch it would join.
        try:
            params = None if row is None else self._insert.params(row)
        except Exception as exc:
            raise StoreError(self._describe(row, exc)) from exc
        ticket = _Ticket(row, params, future)
        if os.getpid() != self._pid:  # forked: the writer thread did not come along, nobody would commit this
            raise StoreError("this capture store was opened before a fork; open another with CaptureStore.open(url) "
                             "in this process")
        with self._lock:
            if self._closed:
                raise StoreError("the capture store is closed; open it again with CaptureStore.open(url)")
            self._queue.put(ticket)
            self.pending += 1
        return ticket

    def _run(self) -> None:
        try:
            while self._commit_next():
                pass
        except BaseException as exc:  # a bug, not a database error: never leave a caller waiting
            self._fail_all(exc)
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()

    def _commit_next(self) -> bool:
        """Commit one batch; False once the stop marker has been seen."""
        batch = self._drain()
        tickets = [t for t in batch if t is not _STOP]
        try:
            self._commit([t for t in tickets if t.row is not None])
        except BaseException as exc:
            for ticket in tickets:
                ticket.error = ticket.error or StoreError(f"the capture writer failed: {exc!r}")
            raise
        finally:
            self._notify(tickets)
        return len(tickets) == len(batch)

    def _drain(self) -> list:
        batch = [self._queue.get()]
        try:
            while len(batch) < self._max_batch and batch[-1] is not _STOP:
                batch.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return batch

    def _commit(self, tickets: list[_Ticket]) -> None:
        if not tickets:
            return
        try:
            self._run_batch([t.params for t in tickets], self._follow_ups([t.row for t in tickets]))
            self.commits += 1
        except self._insert.integrity_error:
            self._commit_one_by_one(tickets)  # so one duplicate id fails only its own caller
        except Exception as exc:
            for ticket in tickets:
                ticket.error = StoreError(self._describe(ticket.row, exc))

    def _commit_one_by_one(self, tickets: list[_Ticket]) -> None:
        for ticket in tickets:
            try:
                self._run_batch([ticket.params], self._follow_ups([ticket.row]))
                self.commits += 1
            except Exception as exc:
                ticket.error = StoreError(self._describe(ticket.row, exc))

    def _follow_ups(self, rows: list[Row]) -> FollowUps:
        return self._then(rows) if self._then is not None else ()

    def _run_batch(self, params: list, then: FollowUps = ()) -> None:
        """Insert `params` in one transaction; when the connection was cut, again on a fresh one (bounded backoff).

        The batch was rolled back with its connection, so nothing is written twice, unless the cut fell between
        the server's commit and its answer: then the retry finds the ids taken and those callers are told so.
        """
        for delay in (*self._reconnect_delays, None):
            try:
                if self._conn is None:
                    self._conn = self._insert.connect()
                self._insert.run(self._conn, params, then)
                return
            except Exception as exc:
                if delay is None or not self._insert.is_disconnect(exc, self._conn):
                    raise
                self._drop_connection()
                time.sleep(delay)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()  # never handed out again by the pool
            self._conn = None
            self.reconnects += 1

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            self._closed = True
        tickets = []
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not _STOP:
                ticket.error = StoreError(f"the capture writer stopped: {exc!r}")
                tickets.append(ticket)
        self._notify(tickets)

    def _notify(self, tickets: list[_Ticket]) -> None:
        with self._lock:
            self.pending -= len(tickets)
        _wake(tickets)


def _wake(tickets: list[_Ticket]) -> None:
    """Wake the waiting threads, and each event loop once for all of its coroutines in this batch."""
    futures_by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for ticket in tickets:
        if ticket.future is None:
            ticket.done.release()
        else:
            futures_by_loop.setdefault(ticket.future.get_loop(), []).append(ticket.future)
    for loop, futures in futures_by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, futures)
        except RuntimeError:  # that event loop has closed; nobody is waiting any more
            pass


def _settle(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():  # a cancelled caller's future is already done
            future.set_result(None)
