"""The workflow's state, its input, and its reducers.

`typing_extensions.TypedDict` (not `typing.TypedDict`): on Python 3.11 LangGraph Studio shows an empty input form
for the latter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from typing_extensions import TypedDict


def merge(old: dict | None, new: dict | None) -> dict:
    """Reducer: parallel sub-agents each add their own keys (task ids, dataset names); `None` clears (a new query)."""
    return {} if new is None else {**(old or {}), **new}


class WorkflowInput(TypedDict):
    query: str


class WorkflowState(TypedDict, total=False):
    query: str
    run_id: str
    templates: dict[str, dict[str, str]]
    plan: dict[str, Any] | None
    plan_note: str | None
    step: int
    results: Annotated[dict[str, dict[str, Any]], merge]
    datasets: Annotated[dict[str, list[dict[str, Any]]], merge]
    answer: str | None


class SubAgentInput(TypedDict, total=False):
    task_id: str
    agent: str
    task: str
    query: str
    run_id: str
    templates: dict[str, dict[str, str]]
    results: dict[str, dict[str, Any]]
    datasets: dict[str, list[dict[str, Any]]]


@dataclass
class WorkflowContext:
    """Per-invocation dependencies (LangGraph `Runtime.context`). Empty under Studio: nodes then use the
    process's default services, built from the same config the CLI reads."""

    services: Any = None
    run_id: str | None = None
