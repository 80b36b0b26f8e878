"""`slmswap templates push | pull`: each route's templates as a Langfuse prompt, and back (prompts/langfuse_prompts.py).

The `templates` Typer app lives in app/cli_templates.py; the lead adds these two commands to it with one line:
`add_langfuse_commands(templates_app)`.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console()
if not out.is_terminal:
    out.width = 200

RouteOpt = typer.Option(None, "--route", "-r", help="Only this route (default: every route with templates).")
ConfigOpt = typer.Option(None, "--config", "-c", help="slmswap.toml to read (default: $SLMSWAP_CONFIG or ./slmswap.toml).")


def add_langfuse_commands(templates_app: typer.Typer) -> None:
    """Register `push` and `pull` on the `templates` Typer app."""
    templates_app.command("push")(push)
    templates_app.command("pull")(pull)


def push(route: str | None = RouteOpt, config: str | None = ConfigOpt) -> None:
    """Create or update one Langfuse prompt per route (`slmswap/<route>`, type text): label `production` on the
    route's best template, `candidate`, `candidate-2`, … on its other live ones; the template id in each version's
    config. Pushing again sends only what changed. Example: slmswap templates push --route retrieval"""
    from app.capture.store import CaptureStore
    from app.config import load_settings
    from prompts.langfuse_prompts import known_routes, push_prompts

    settings = load_settings(config)
    with CaptureStore.open(settings.store.url) as store:
        report = push_prompts(settings, store, route, routes=known_routes(settings, store))
    table = Table(title=f"pushed to Langfuse at {report.host}")
    for column in ("route", "template", "labels", "sent"):
        table.add_column(column)
    for sent, rows in (("new version", report.created), ("labels", report.relabelled)):
        for r, template_id, labels in rows:
            table.add_row(Text(r), Text(template_id), Text(", ".join(labels)), Text(sent))
    for r in report.unchanged:
        table.add_row(Text(r), Text("(all)"), Text(""), Text("nothing: already in sync"))
    out.print(table)


def pull(route: str | None = RouteOpt, config: str | None = ConfigOpt) -> None:
    """Import the `production` and `candidate*` versions of the routes' Langfuse prompts as templates of origin
    `langfuse` (a text already in the store is not added again). Everything is fetched before anything is written.
    Example: slmswap templates pull --route retrieval"""
    from app.capture.store import CaptureStore
    from app.config import load_settings
    from prompts.langfuse_prompts import pull_prompts

    settings = load_settings(config)
    with CaptureStore.open(settings.store.url) as store:
        report = pull_prompts(settings, store, route)
    table = Table(title=f"pulled from Langfuse at {report.host}")
    for column in ("route", "template", "langfuse version", "result"):
        table.add_column(column)
    for result, rows in (("added (origin langfuse)", report.added), ("already in the store", report.present)):
        for r, template_id, version in rows:
            table.add_row(Text(r), Text(template_id), Text(str(version)), Text(result))
    out.print(table)
    if not report.added and not report.present:
        out.print(Text("no labelled prompt versions found under slmswap/ on that host"), highlight=False)
