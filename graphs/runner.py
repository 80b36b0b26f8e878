"""Runs the workflow once for the CLI: open the services, invoke the graph, close the run, summarise its calls."""

from __future__ import annotations

import asyncio
from contextlib import nullcontext
from typing import Any

from app.capture.records import call_summary
from app.config import load_settings
from app.observability import flush, run_callbacks
from app.services import Services
from graphs.state import WorkflowContext


def run_workflow(query: str, config_path: str | None = None, binding: str | None = None,
                 progress: Any = None) -> dict[str, Any]:
    """Run the graph on `query`; returns `{answer, plan, results, calls, run_id}`. Ctrl-C marks the run interrupted."""
    settings = load_settings(config_path)
    if binding:
        settings = settings.bound_to(binding)
    services = Services.from_settings(settings)  # the store opens (or fails) before any model loads
    run_id = services.store.start_run(query)
    try:
        state = _invoke(query, services, run_id, progress)
        calls = [call_summary(c) for c in services.store.calls_for_run(run_id)]
    except KeyboardInterrupt:
        services.store.finish_run(run_id, "interrupted", error="interrupted by the user")
        raise
    except BaseException as exc:
        services.store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        flush()
        services.close()
    return {"answer": state["answer"], "plan": state["plan"], "results": state.get("results", {}),
            "calls": calls, "run_id": run_id}


def _invoke(query: str, services: Services, run_id: str, progress: Any) -> dict[str, Any]:
    from graphs.workflow import graph

    config = {"callbacks": run_callbacks(services.settings, run_id), "run_name": "slmswap run",
              "metadata": {"run_id": run_id}}
    context = WorkflowContext(services=services, run_id=run_id)
    label = "running the workflow on " + services.settings.default_binding
    with progress.status(label) if progress is not None else nullcontext():
        return asyncio.run(graph.ainvoke({"query": query}, config, context=context))

