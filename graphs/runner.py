"""Runs the workflow once for the CLI: open the services, invoke the graph, close the run, summarise its calls."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from rich.text import Text

from app.capture.records import call_summary
from app.config import load_settings
from app.observability import flush, run_callbacks
from app.services import Services
from graphs.state import WorkflowContext


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run. A KeyboardInterrupt, so asyncio and every cleanup path treat it exactly like Ctrl-C."""

    exit_code = 128 + signal.SIGTERM

    def __init__(self) -> None:
        super().__init__("terminated by SIGTERM")


def run_workflow(query: str, config_path: str | None = None, binding: str | None = None,
                 progress: Any = None) -> dict[str, Any]:
    """Run the graph on `query`; returns `{answer, plan, results, calls, run_id}`.

    Ctrl-C (SIGINT) and SIGTERM mark the run interrupted; a run whose process is killed outright (kill -9) is
    left `running`, and the store reports it as `died` (it records the pid and host).
    """
    settings = load_settings(config_path)
    if binding:
        settings = settings.bound_to(binding)
    services = Services.from_settings(settings)  # the store opens (or fails) before any model loads
    with _sigterm_interrupts():
        run_id = services.store.start_run(query)
        try:
            state = _invoke(query, services, run_id, progress)
            calls = [call_summary(c) for c in services.store.calls_for_run(run_id)]
        except KeyboardInterrupt as exc:
            services.store.finish_run(run_id, "interrupted", error=str(exc) or "interrupted by the user")
            raise
        except BaseException as exc:
            services.store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            flush()
            services.close()
    return {"answer": state["answer"], "plan": state["plan"], "results": state.get("results", {}),
            "calls": calls, "run_id": run_id}


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the run lasts, SIGTERM raises Terminated in the main thread (its default would kill the process
    before the run is marked). Off the main thread Python cannot install handlers; leave SIGTERM as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _invoke(query: str, services: Services, run_id: str, progress: Any) -> dict[str, Any]:
    from graphs.workflow import graph

    config = {"callbacks": run_callbacks(services.settings, run_id), "run_name": "slmswap run",
              "metadata": {"run_id": run_id}}
    context = WorkflowContext(services=services, run_id=run_id)
    label = Text("running the workflow on " + services.settings.default_binding)  # a binding is not markup
    with progress.status(label) if progress is not None else nullcontext():
        return asyncio.run(graph.ainvoke({"query": query}, config, context=context))
