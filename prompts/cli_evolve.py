"""`slmswap templates evolve [--route R]`: a child template per route from the error patterns of its best
template's captured calls (`prompts/evolve.py`), added live as origin `evolved`, for selection to try and judge.

`evolve_routes` does the work (the serve schedule calls it too); the command parses and prints. Register it on the
templates group: `from prompts.cli_evolve import register; register(templates_app)`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import typer

from prompts.evolve import Evolution, evolve, observations, reflect

TEACHER_ROUTE = "templates-teacher"
SCAN = 5000  # newest calls read per route


@dataclass(frozen=True)
class Outcome:
    route: str
    parent_id: str | None
    evolution: Evolution
    written: tuple[str, ...] = ()  # ids of the templates saved (the rule-based child, then reflective ones)


def evolve_routes(store: Any, routes: list[str] | None = None, k: int = 2, teacher: str | None = None,
                  settings: Any = None, dynamic: bool = False) -> list[Outcome]:
    """Evolve each route (default: every route with captured calls) from its best template's calls."""
    chosen = routes or sorted({s.agent for s in store.stats() if s.agent})
    return [evolve_route(store, route, k, teacher, settings, dynamic) for route in chosen]


def evolve_route(store: Any, route: str, k: int = 2, teacher: str | None = None, settings: Any = None,
                 dynamic: bool = False) -> Outcome:
    parent = best_template(store, route)
    records = [c for c in store.list_calls(agent=route, limit=SCAN)
               if c.route == route and (parent is None or c.template_id == parent.id)]
    parent_text = parent.text if parent else ""
    observed = observations(records, parent_text)
    result = evolve(parent_text, observed, k=k, dynamic=dynamic)
    written = []
    if result.text is not None:
        written.append(save_child(store, route, result.text, parent))
    if teacher and (failures := [o for o in observed if o.failed]):
        proposal = asyncio.run(reflect(parent_text, failures, teacher_ask(settings, teacher)))
        if proposal:
            written.append(save_child(store, route, proposal, parent))
            result = Evolution(result.text, result.reason + "; the teacher proposed a rewrite", result.rules,
                               result.examples, result.failures, result.observed, (proposal,))
    return Outcome(route, parent.id if parent else None, result, tuple(written))


def best_template(store: Any, route: str) -> Any:
    """The route's best template (highest posterior mean with enough trials), else its shipped base, else the live
    one with the most outcomes (the one its calls say most about), else None."""
    from prompts import store as template_store

    found = template_store.best(store, route) or template_store.ensure_base(store, route)
    live = template_store.live_templates(store, route)
    return found or (max(reversed(live), key=lambda t: t.trials) if live else None)


def save_child(store: Any, route: str, text: str, parent: Any) -> str:
    """Add the child as a live template (an identical text is found, not stored twice): selection's Thompson
    sampling then tries it beside its parent, and retires the loser. Returns its id."""
    from prompts import store as template_store

    return template_store.add_template(store, route, text, parent=parent.id if parent else None,
                                       origin="evolved").id


def teacher_ask(settings: Any, binding: str):
    """An `Ask` over the Router: the teacher binding as the teacher of its own route, captured like any call."""
    from app.config import RouteConfig, load_settings
    from app.routing.context import CallContext
    from app.routing.router import Router
    from app.wire import ChatRequest

    settings = settings or load_settings(None)
    routes = dict(settings.routes) | {TEACHER_ROUTE: RouteConfig(teacher=binding)}
    router = Router(settings.model_copy(update={"routes": routes}), store=None)

    async def ask(messages: list[dict[str, Any]]) -> str:
        req = ChatRequest(model=TEACHER_ROUTE, messages=messages, temperature=0.0, max_tokens=1500)
        resp = await router.complete(req, CallContext(route=TEACHER_ROUTE, source="graph"))
        return resp.message.content or ""

    return ask


# ---- the command ------------------------------------------------------------------------------------------

def evolve_command(
    route: list[str] = typer.Option(None, "--route", "-r", help="Only this route; repeat for more (default: all)."),
    k: int | None = typer.Option(None, "--examples", "-k", min=0, max=8,
                                 help="Worked examples per child (default: [evolve] examples, 2)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Write {{examples}} (filled per request) instead."),
    teacher: str | None = typer.Option(None, "--teacher", help="A binding for a reflective rewrite "
                                       "(default: [evolve] teacher in the config; none: rules only)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per route."),
    config: str | None = typer.Option(None, "--config", "-c", help="slmswap.toml to read."),
) -> None:
    """Write a child template per route from its captured failures, e.g. `slmswap templates evolve -r retrieval`."""
    from app.capture.store import CaptureStore
    from app.config import load_settings

    settings = load_settings(config)
    teacher = teacher or settings.evolve.teacher
    k = settings.evolve.examples if k is None else k
    with CaptureStore.open(settings.store.url) as store:
        outcomes = evolve_routes(store, list(route or []) or None, k, teacher, settings, dynamic)
    if not outcomes:
        typer.echo("no captured calls in the store: nothing to evolve, nothing written")
    for o in outcomes:
        typer.echo(json.dumps(_as_json(o)) if as_json else format_outcome(o))


def format_outcome(o: Outcome) -> str:
    lines = [f"{o.route} (from {o.parent_id or 'no template'}): {o.evolution.reason}"]
    lines += [f"  rule ({r.calls} calls): {r.text}" for r in o.evolution.rules]
    lines += [f"  example from call {e.call_id[:8]}" for e in o.evolution.examples]
    lines += [f"  wrote {t}" for t in o.written]
    return "\n".join(lines)


def _as_json(o: Outcome) -> dict[str, Any]:
    return {"route": o.route, "parent": o.parent_id, "written": list(o.written), "reason": o.evolution.reason,
            "failures": o.evolution.failures, "observed": o.evolution.observed,
            "rules": [{"pattern": r.pattern, "text": r.text, "calls": r.calls} for r in o.evolution.rules],
            "examples": [e.call_id for e in o.evolution.examples]}


def register(templates_app: typer.Typer) -> None:
    templates_app.command("evolve")(evolve_command)


def scheduled_evolution(settings: Any):
    """The job `serve` runs every `[evolve] every_minutes`: evolve every route, log what was written."""
    import logging

    log = logging.getLogger("slmswap.evolve")

    def job() -> list[Outcome]:
        from app.capture.store import CaptureStore

        with CaptureStore.open(settings.store.url) as store:
            outcomes = evolve_routes(store, None, settings.evolve.examples, settings.evolve.teacher, settings)
        for o in outcomes:
            log.info("%s", format_outcome(o))
        return outcomes

    return job
