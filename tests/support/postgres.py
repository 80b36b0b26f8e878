"""A throwaway PostgreSQL cluster for the store tests: initdb in a temp dir, listening on 127.0.0.1 on a free port,
one fresh database per test. Without PostgreSQL's binaries the tests skip locally and fail in CI (`CI` set)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

USER = "postgres"  # the cluster's superuser (trust auth on loopback only)
# A time zone with a half-hour offset, so a datetime that loses or misreads its zone fails a round trip.
SERVER_TIMEZONE = "Asia/Kolkata"
READY_TIMEOUT_S = 60
RUN_AS = "postgres"  # the OS user initdb and postgres run as when the tests run as root


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: pg_config's answer, Debian's versioned dirs, or the PATH."""
    candidates = []
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(str(Path(initdb).resolve().parent))
    for directory in candidates:
        if directory and all((Path(directory) / tool).is_file() for tool in ("initdb", "pg_ctl", "pg_isready")):
            return Path(directory)
    return None


def require_bindir() -> Path:
    """PostgreSQL's bin dir; skip without it (fail when CI is set, so CI never skips the PostgreSQL store tests)."""
    bindir = find_bindir()
    if bindir is None:
        fix = "install PostgreSQL (apt-get install -y postgresql) or put initdb and pg_ctl on the PATH"
        if in_ci():
            pytest.fail(f"CI is set but PostgreSQL's binaries were not found; {fix}", pytrace=False)
        pytest.skip(f"needs PostgreSQL's binaries: {fix}")
    return bindir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One PostgreSQL server in its own data directory; `start`, `restart`, `stop`, `create_database`."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="slmswap-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._databases = 0
        # initdb and postgres refuse to run as root: run them as an unprivileged user that owns the directory.
        self._as = ["runuser", "-u", RUN_AS, "--"] if os.geteuid() == 0 else []
        if self._as:
            try:
                shutil.chown(self.root, RUN_AS, RUN_AS)
            except LookupError:
                raise RuntimeError(f"running as root, the test cluster needs an unprivileged user {RUN_AS!r} to own "
                                   f"it (Debian's postgresql package creates one; or: useradd -r {RUN_AS})") from None

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([*self._as, str(self.bindir / tool), *args], capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def start(self) -> Cluster:
        self._pg("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8")
        for attempt in range(3):
            try:
                self._pg_ctl("start")
                return self
            except RuntimeError:  # the free port was taken meanwhile (by another test session): take another
                if attempt == 2:
                    raise
                self.port = free_port()
        return self

    def restart(self) -> None:
        """A real server restart: every open connection is cut, as when a production database restarts."""
        self._pg_ctl("restart", "-m", "fast")

    def stop_server(self) -> None:
        """Stop the server, keeping its data (`start_server` brings it back on the same port)."""
        self._pg("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")

    def start_server(self) -> None:
        self._pg_ctl("start")

    def stop(self) -> None:
        if self.data.exists():
            self._pg("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def _pg_ctl(self, action: str, *args: str) -> None:
        # Loopback TCP only (no Unix socket); fsync off: these clusters are thrown away, never power-cut.
        options = (f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c full_page_writes=off "
                   f"-c timezone={SERVER_TIMEZONE} -c max_connections=200")
        self._pg("pg_ctl", action, *args, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                 "-t", str(READY_TIMEOUT_S), "-o", options)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Poll pg_isready until the server accepts connections (bounded; a hang would be a broken server)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self._pg("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-q", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} did not become ready; see {self.root}/server.log")
            time.sleep(0.05)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        self._databases += 1
        name = f"t{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def connect(self, url: str):
        """A plain psycopg connection (autocommit) to the database behind `url`, for tests that act beside the store."""
        import psycopg

        return psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname={url.rsplit('/', 1)[1]}",
                               autocommit=True)
