"""Fixtures shared by the Langfuse tests: import them into a test module (`fresh_client` applies itself)."""

from __future__ import annotations

import pytest

from app import observability
from tests.support.langfuse_receiver import LangfuseReceiver


@pytest.fixture(autouse=True)
def fresh_client():
    """Each test builds its own Langfuse client from its own keys; none outlives the test."""
    observability.shutdown()
    yield
    observability.shutdown()


@pytest.fixture
def receiver():
    with LangfuseReceiver() as r:
        yield r
