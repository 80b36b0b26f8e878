"""Group commit: one writer thread drains a queue and inserts everything queued in one transaction.

A caller waits (or awaits) until the transaction holding its row has committed, so a write is durable when it
returns; callers who arrive while a commit is under way share the next one, which is what makes many
concurrent recorders cheap. The INSERT is compiled once and run on the writer's own DBAPI connection, because
SQLAlchemy's per-execute bookkeeping costs more than SQLite's insert itself. A KeyboardInterrupt reaches only
the caller's thread, never the writer's, and a batch is one transaction, so no batch is ever half written.
Waking a caller never blocks the writer, wherever Ctrl-C left that caller (see `_Ticket`). On a database server
the writer outlives a restart: a batch whose connection was cut is committed again on a fresh one.

With a journal (`journal.py`), `journal()` returns as soon as one os.write() has made the row durable against the
process being killed, without waiting for the commit: that is what answered proxy requests use. Journaled rows go
through the same batches; what a process left in its journal is replayed (idempotently, by call id) when the next
writer starts, before it takes new rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import DateTime, Engine, Table
from sqlalchemy.exc import DBAPIError

from app.capture import journal as journal_mod
from app.capture.journal import Journal, Segment
from app.errors import StoreError

log = logging.getLogger("slmswap.capture")

Row = dict[str, Any]
FollowUps = list[tuple[str, list]] | tuple  # statements a batch runs after its INSERT, in its transaction
_STOP = object()
_LINGER = object()  # a wake-up for journaled rows: the writer lingers, then takes every journaled row at once
# How long the writer lets journaled rows gather before it commits them. Nobody waits for those rows (they are
# durable in the journal), so waking the writer for each one would only buy thread switches on the request path.
JOURNAL_LINGER_S = 0.05
# Seconds to wait before each new attempt when a batch finds its connection gone: about 30 s in all, longer than a
# PostgreSQL restart or failover takes; after that the batch's callers get the error.
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1, 2, 2, 4, 4, 8, 8)


class CompiledInsert:
    """An INSERT of whole rows into `table`, compiled once for the engine's dialect."""

    def __init__(self, engine: Engine, table: Table):
        dialect = engine.dialect
        compiled = table.insert().compile(dialect=dialect)
        self.sql = compiled.string
        self.datetime_keys = frozenset(c.key for c in table.columns if isinstance(c.type, DateTime))
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

    __slots__ = ("row", "params", "error", "done", "future", "segment")

    def __init__(self, row: Row | None, params, future: asyncio.Future | None = None, segment: Segment | None = None):
        self.row, self.params, self.future, self.segment = row, params, future, segment
        self.done = None if future is not None or segment is not None else _held_lock()
        self.error: BaseException | None = None


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


class GroupCommitWriter:
    """Writes rows through one background thread; `write` returns once the row is committed."""

    def __init__(self, insert: CompiledInsert, *, describe: Callable[[Row, BaseException], str], max_batch=2000,
                 reconnect_delays: tuple[float, ...] = RECONNECT_DELAYS,
                 then: Callable[[list[Row]], FollowUps] | None = None, journal_dir=None):
        self._insert = insert
        self._then = then  # the statements a batch of rows implies (the template counts its calls move)
        self._reconnect_delays = reconnect_delays
        self._conn = None  # the writer's own connection, opened on the first batch and again after a cut
        self._describe = describe  # turns a failed row into a message for the caller
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lazy: list[_Ticket] = []  # journaled tickets not yet taken by the writer (under _lock)
        self._lazy_armed = False  # a _LINGER is queued or the writer is lingering: no need to wake it again
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self.commits = 0  # transactions committed, for tests and the bench
        self.reconnects = 0  # connections replaced after a cut, for tests
        self.pending = 0  # tickets queued or being committed whose callers are not yet woken, for tests
        self.journaled = 0  # journaled rows not yet committed (or refused): a reader of this process waits for them
        self.replayed = 0  # rows replayed from journals that dead processes left, for tests
        self._journal: Journal | None = None
        if journal_dir is not None:
            self._replay(journal_dir)
            self._journal = Journal(journal_dir)
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

    def journal(self, row: Row) -> bool:
        """Make `row` durable against this process dying with one write to the journal, and queue it for the
        next commit without waiting; False (nothing done) when this writer has no journal."""
        if self._journal is None:
            return False
        self._submit(row, journal=self._journal)
        return True

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
            if self._journal is not None:
                self._journal.close()

    def _submit(self, row: Row | None, future: asyncio.Future | None = None, journal: Journal | None = None) -> _Ticket:
        # Serialize here, on the caller's thread: bad data fails its own caller, never the batch it would join. A
        # journaled row was serialized by its journal line already; its parameters are made by the writer thread.
        try:
            params = None if row is None or journal is not None else self._insert.params(row)
        except Exception as exc:
            raise StoreError(self._describe(row, exc)) from exc
        if os.getpid() != self._pid:  # forked: the writer thread did not come along, nobody would commit this
            raise StoreError("this capture store was opened before a fork; open another with CaptureStore.open(url) "
                             "in this process")
        with self._lock:
            if self._closed:
                raise StoreError("the capture store is closed; open it again with CaptureStore.open(url)")
            segment = None
            if journal is not None:
                try:
                    segment = journal.append(row)  # before it is queued: a commit may settle it at once
                except (OSError, TypeError) as exc:
                    raise StoreError(f"could not write the capture journal in {journal.directory}: {exc}; check "
                                     "that its disk has room") from exc
                self.journaled += 1
            ticket = _Ticket(row, params, future, segment)
            self.pending += 1
            if segment is None:
                self._queue.put(ticket)
            else:  # nobody waits for it: the writer is woken once for all the rows of the next JOURNAL_LINGER_S
                self._lazy.append(ticket)
                if not self._lazy_armed:
                    self._lazy_armed = True
                    self._queue.put(_LINGER)
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
        stopped = len(tickets) < len(batch)
        try:
            self._commit([t for t in tickets if t.row is not None])
        except BaseException as exc:
            for ticket in tickets:
                ticket.error = ticket.error or StoreError(f"the capture writer failed: {exc!r}")
            raise
        finally:
            self._notify(tickets)
        return not stopped

    def _drain(self) -> list:
        """The next batch: what is queued (waiting callers, the stop marker) plus every journaled row so far."""
        first = self._queue.get()
        if first is _LINGER:
            try:  # let journaled rows gather, unless a caller who waits (or close) comes first
                first = self._queue.get(timeout=JOURNAL_LINGER_S)
            except queue.Empty:
                first = None
        batch = [] if first is None or first is _LINGER else [first]
        try:
            while len(batch) < self._max_batch and (not batch or batch[-1] is not _STOP):
                item = self._queue.get_nowait()
                if item is not _LINGER:
                    batch.append(item)
        except queue.Empty:
            pass
        with self._lock:
            lazy, self._lazy, self._lazy_armed = self._lazy, [], False
        # The stop marker stays last: everything before it is committed before the thread ends.
        if batch and batch[-1] is _STOP:
            return [*batch[:-1], *lazy, _STOP]
        return [*batch, *lazy]

    def _commit(self, tickets: list[_Ticket]) -> None:
        for ticket in tickets:
            if ticket.params is None:  # journaled: its parameters are made here, off the request path
                try:
                    ticket.params = self._insert.params(ticket.row)
                except Exception as exc:  # noqa: BLE001 - it stays in the journal, and the log says why
                    ticket.error = StoreError(self._describe(ticket.row, exc))
        tickets = [t for t in tickets if t.error is None]
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
            tickets, self._lazy = self._lazy, []
        for ticket in tickets:
            ticket.error = StoreError(f"the capture writer stopped: {exc!r}")
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not _STOP and ticket is not _LINGER:
                ticket.error = StoreError(f"the capture writer stopped: {exc!r}")
                tickets.append(ticket)
        self._notify(tickets)

    def _notify(self, tickets: list[_Ticket]) -> None:
        journaled = [t for t in tickets if t.segment is not None]
        for ticket in journaled:  # nobody waits for these: settle them in the journal, and say why one failed
            self._journal.settled(ticket.segment, ticket.error is None)
            if ticket.error is not None:
                log.error("a journaled call was not committed (it stays in %s and is replayed at the next start): "
                          "%s", ticket.segment.path, ticket.error)
        with self._lock:
            self.pending -= len(tickets)
            self.journaled -= len(journaled)
        _wake(tickets)

    def _replay(self, directory) -> None:
        """Commit what dead processes left in their journals (rows already stored are skipped), then delete
        those segments. A segment that cannot be committed now stays for the next start."""
        for path, rows, bad in journal_mod.orphans(directory):
            params = []  # (insert parameters, the row): the row gives its template follow-ups
            for row in rows:
                try:
                    revived = journal_mod.revive(row, self._insert.datetime_keys)
                    params.append((self._insert.params(revived), revived))
                except Exception as exc:  # noqa: BLE001 - one unreadable row must not keep the others out
                    bad += 1
                    log.error("skipping a journaled call that cannot be stored (%s) in %s", exc, path)
            try:
                if params:
                    self._replay_batch(params)
            except Exception as exc:  # noqa: BLE001 - the store is away: keep the segment, open anyway
                log.error("could not replay the capture journal %s (%d calls; kept for the next start): %s",
                          path, len(params), exc)
                continue
            if bad:
                log.error("%d unreadable lines in the capture journal %s were skipped", bad, path)
            self.replayed += len(params)
            path.unlink(missing_ok=True)
        if self._conn is not None:  # back to the pool: the writer thread takes its own
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _replay_batch(self, params: list) -> None:
        # Row by row (a replay is rare: after a crash): a row already stored fails only itself, and its template
        # counts, which moved in the transaction that stored it, are not moved twice.
        for one, row in params:
            with contextlib.suppress(self._insert.integrity_error):
                self._run_batch([one], self._follow_ups([row]))


def _wake(tickets: list[_Ticket]) -> None:
    """Wake the waiting threads, and each event loop once for all of its coroutines in this batch."""
    futures_by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for ticket in tickets:
        if ticket.segment is not None:  # journaled: nobody waits
            continue
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
