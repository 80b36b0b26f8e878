"""Shared fixtures: every test runs in its own working directory with no slm-swap or Langfuse variables set; one
throwaway PostgreSQL cluster per session for the store tests that run on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import postgres as postgres_support
from tests.support import scripted as scripted_support

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh cwd (so `.slmswap/` and `slmswap.toml` are the test's own) and a clean environment."""
    for name in list(os.environ):
        if name.startswith(("SLMSWAP_", "LANGFUSE_", "AZURE_OPENAI_", "OPENAI_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture
def scripted():
    """`scripted("name")` gives the script behind binding `scripted:name`; scripts are reset after the test."""
    scripted_support.reset()
    yield scripted_support.scripted
    scripted_support.reset()


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL cluster, started on first use (a start costs seconds) and removed at the end."""
    from tests.support.requires import require

    require("psycopg")
    cluster = postgres_support.Cluster(postgres_support.require_bindir())
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres) -> str:
    """A fresh, empty PostgreSQL database of its own for this test."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A store URL per database the store is tested on: a SQLite file in a new folder, or a fresh PostgreSQL one."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'nested' / 'capture.db'}"
