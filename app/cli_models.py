"""`slmswap models …` (the registry of trained models) and `slmswap loop` (the learning loop).

Each command parses, calls `training/registry.py` or `training/loop.py`, prints. Registered in `app/cli.py` with
`app.add_typer(models_app, name="models")` and `app.command("loop")(loop)`.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

models_app = typer.Typer(no_args_is_help=True, help="Trained models: list them, promote one to a route's student.")
out = Console()
if not out.is_terminal:
    out.width = 200

ConfigOpt = typer.Option(None, "--config", "-c", help="slmswap.toml to read (default: $SLMSWAP_CONFIG or ./slmswap.toml).")


@models_app.command("list")
def models_list(
    route: str | None = typer.Option(None, "--route", "-r", help="Only this route's models."),
    config: str | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The registered models, newest first. Example: slmswap models list --route retrieval"""
    from app.capture.store import CaptureStore
    from app.config import load_settings

    with CaptureStore.open(load_settings(config).store.url) as store:
        rows = store.list_models(route=route)
    if as_json:
        out.print_json(json.dumps([{**_fields(m), "created_at": m.created_at.isoformat()} for m in rows]))
        return
    table = Table()
    for column in ("id", "route", "status", "binding", "exact (teacher)", "created"):
        table.add_column(column)
    for m in rows:
        table.add_row(*(Text(v) for v in (m.id[:12], m.route, m.status, m.binding, _exact(m),
                                          m.created_at.strftime("%Y-%m-%d %H:%M"))))
    out.print(table)


@models_app.command("promote")
def models_promote(
    model_id: str = typer.Argument(..., help="The model's id (or its first characters; see `slmswap models list`)."),
    route: str = typer.Option(..., "--route", "-r", help="The route whose student it becomes."),
    config: str | None = ConfigOpt,
) -> None:
    """Make a model the route's student at stage shadow; the rollout gates take it from there.

    Example: slmswap models promote 3f2a91 --route retrieval
    """
    from app.capture.store import CaptureStore
    from app.config import load_settings
    from training.registry import check_route, promote

    settings = load_settings(config)
    check_route(settings, route)  # before the store is opened: a typo costs nothing
    with CaptureStore.open(settings.store.url) as store:
        model = store.get_model(model_id)
        state = promote(store, settings, model, route, "promoted by hand (slmswap models promote)", {"by": "cli"})
    out.print(Text(f"{route}: student {state.student} at stage {state.stage} (model {model.id[:12]})"),
              highlight=False)


def loop(
    once: bool = typer.Option(False, "--once", help="One round over the routes, then exit."),
    route: list[str] = typer.Option(None, "--route", "-r", help="Only this route; repeat for more."),
    config: str | None = ConfigOpt,
) -> None:
    """Per route: with enough new calls, build -> train -> export -> evaluate -> register -> promote to shadow.
    Without --once it repeats every loop.every_s seconds (config) until Ctrl-C. Example: slmswap loop --once -r retrieval"""
    import time

    from app.capture.store import CaptureStore
    from app.config import load_settings
    from training.loop import loop_routes, run_loop

    settings = load_settings(config)
    routes = loop_routes(settings, route or None)
    if not once and settings.loop.every_s is None:
        from app.errors import UsageError

        raise UsageError("set [loop] every_s in the config to repeat the loop, or pass --once")
    with CaptureStore.open(settings.store.url) as store:
        while True:
            results = run_loop(settings, store, routes)
            _print_runs(results)
            if once:
                break
            time.sleep(settings.loop.every_s)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


def _print_runs(results) -> None:
    table = Table()
    for column in ("route", "status", "model", "why"):
        table.add_column(column)
    for r in results:
        table.add_row(*(Text(v) for v in (r.route, r.status, (r.model_id or "-")[:12], r.reason)))
    out.print(table)


def _fields(model) -> dict:
    return {k: getattr(model, k) for k in model.__slots__ if k != "created_at"}


def _exact(model) -> str:
    exact = ((model.metrics or {}).get("eval") or {}).get("exact") or {}
    if model.binding not in exact:
        return "-"
    others = [v for b, v in exact.items() if b != model.binding]
    return f"{exact[model.binding]:.0%}" + (f" ({others[0]:.0%})" if others else "")
