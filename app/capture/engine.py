"""Opening the capture database: check a SQLite path before touching it, then one Engine with safe settings.

SQLite gets WAL (readers never block the writer), synchronous=NORMAL (a commit survives the process being
killed, not a power cut), a busy timeout and foreign keys. The sqlite3 driver is told to stay out of
transaction control and SQLAlchemy emits BEGIN itself, so DDL in migrations is transactional like on PostgreSQL.
PostgreSQL (postgresql+psycopg://) gets pre-pinged pooled connections, so a restarted server costs no request.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from app.errors import ConfigError, MissingDependency, StoreError

try:
    import orjson
except ImportError:  # optional: the standard library's json is used instead
    orjson = None

FIX = "set store.url in slmswap.toml or SLMSWAP_STORE__URL"
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 10_000
_BEGIN_OPTION = "slmswap_begin"
# PostgreSQL advisory lock keys (any constant bigint; these spell "slmswapW" and "slmswapM" in ASCII).
WRITE_LOCK_KEY = 0x736C6D7377617057
MIGRATE_LOCK_KEY = 0x736C6D737761704D


def open_engine(url: str) -> Engine:
    """An Engine for `url`; a SQLite file's directory is created and checked before anything else."""
    parsed = _parse(url)
    return _sqlite_engine(parsed) if parsed.get_backend_name() == "sqlite" else _server_engine(parsed)


def _sqlite_engine(url: URL) -> Engine:
    url = url.set(database=str(check_sqlite_path(url.database)))
    engine = create_engine(url, json_serializer=dumps, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _server_engine(url: URL) -> Engine:
    try:
        return create_engine(url, json_serializer=dumps, pool_pre_ping=True)
    except NoSuchModuleError:
        raise ConfigError(f"the store URL scheme {url.drivername!r} is no database SQLAlchemy knows; use "
                          f"sqlite:///path/to/calls.db or postgresql+psycopg://user@host/db ({FIX})") from None
    except ImportError as exc:
        raise MissingDependency(f"the store URL {url.drivername}://... needs a driver that is not installed "
                                f"({exc.name}); {_DRIVER_HINTS.get(url.get_backend_name(), _OTHER_DRIVER)}, "
                                f"or {FIX}") from None


# Per database the store URL names, how to get its driver (a MySQL URL must not get the PostgreSQL hint).
_DRIVER_HINTS = {
    "postgresql": "pip install 'psycopg[binary]' and use postgresql+psycopg://",
    "mysql": "pip install pymysql and use mysql+pymysql:// (slm-swap is tested on SQLite and PostgreSQL only)",
    "mariadb": "pip install pymysql and use mariadb+pymysql:// (slm-swap is tested on SQLite and PostgreSQL only)",
}
_OTHER_DRIVER = "install that driver with pip, or use SQLite or PostgreSQL (the databases slm-swap is tested on)"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the write lock from its first statement (BEGIN IMMEDIATE on SQLite).

    Use it for read-then-write work, so two processes cannot both read and then collide on the write. On
    PostgreSQL a transaction-level advisory lock plays BEGIN IMMEDIATE's part: read committed alone would let two
    proxy processes read the same route state and both write "version + 1".
    """
    with engine.connect().execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"}) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
        yield conn


def dumps(value: Any) -> str:
    """JSON text for a JSON column: orjson when installed (several times faster on every recorded call)."""
    if orjson is None:
        return json.dumps(value)
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY).decode()


def check_sqlite_path(database: str | None) -> Path:
    """The absolute path of a SQLite file we can use; StoreError naming the path and the fix otherwise."""
    if not database or database == ":memory:" or database.startswith("file:"):
        raise StoreError(f"the capture store needs a SQLite file, not {database or 'memory'!r}; "
                         f"use sqlite:///path/to/calls.db ({FIX})")
    path = Path(database).expanduser().absolute()
    _ensure_writable_dir(path.parent)
    if path.exists():
        _check_existing_file(path)
    return path


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"store URL {url!r} does not parse ({exc}); {FIX}") from None


def _ensure_writable_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store directory {directory}: {exc.strerror}; {FIX}") from None
    # SQLite writes -wal and -shm files beside the database, so the directory itself must be writable.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(f"the store directory {directory} is not writable; {FIX}")


def _check_existing_file(path: Path) -> None:
    if not path.is_file():
        raise StoreError(f"the store path {path} is not a file; {FIX}")
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"the store file {path} is not readable and writable; {FIX}")
    with path.open("rb") as f:
        header = f.read(len(SQLITE_MAGIC))
    if header and header != SQLITE_MAGIC:
        raise StoreError(f"{path} is not a SQLite database (left untouched); {FIX} to a new file")


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _enter_wal(cur)
    for pragma in ("synchronous=NORMAL", "foreign_keys=ON"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def _enter_wal(cur) -> None:
    """Switch to WAL, retrying: on a new database the switch needs an exclusive lock and SQLite answers
    "database is locked" at once, busy timeout or not, when another connection opens it at the same moment
    (the CLI and `slmswap studio` starting together, or the writer thread beside the first reader)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))
