"""Callbacks attached to every graph run (Langfuse's handler when configured); the proxy will reuse them."""

from __future__ import annotations

from typing import Any

from app.config import Settings


def run_callbacks(settings: Settings) -> list[Any]:
    """LangChain callback handlers for one run. Langfuse arrives with the "Observability and Studio" issue."""
    return []


def flush() -> None:
    """Flush background exporters before the process exits."""
