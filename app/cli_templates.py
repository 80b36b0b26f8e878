"""`slmswap templates …`: a route's templates with their outcomes, one template's text and diff to its parent, and
the error patterns of the calls made under each template.

`templates_app` is registered in app/cli.py as `templates`; other commands (`evolve`, `push`, `pull`) are added to
it by their own modules. The template store itself is prompts/store.py (imported inside the commands: this is the
composition root, app/ modules never import prompts/).
"""

from __future__ import annotations

import difflib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.errors import UsageError

templates_app = typer.Typer(no_args_is_help=True, help="See each route's templates, their outcomes and errors.")
out = Console()
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out.width = 200

ConfigOpt = typer.Option(None, "--config", "-c", help="slmswap.toml to read (default: $SLMSWAP_CONFIG or ./slmswap.toml).")
RouteOpt = typer.Option(None, "--route", "-r", help="Only this route.")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")
_RELATIVE = re.compile(r"^(\d+)\s*([mhd])$")


@templates_app.command("list")
def list_command(route: str | None = RouteOpt, as_json: bool = JsonOpt, config: str | None = ConfigOpt) -> None:
    """Templates by route: id, origin, trials, success rate with its 95% Wilson interval, status.
    Example: slmswap templates list --route retrieval"""
    with _store(config) as store:
        rows = [template_summary(t) for t in store.list_templates(route)]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if not rows:
        out.print("no templates yet" + (f" on route {route!r}" if route else "")
                  + ": the first run (`slmswap run ...`) or proxy call registers the base ones")
        return
    table = Table("route", "id", "origin", "parent", "trials", "success [95% interval]", "status")
    for r in rows:
        success = f"{r['success']:.1%} [{r['low']:.1%}, {r['high']:.1%}]" if r["trials"] else "-"
        table.add_row(*map(Text, (r["route"], r["id"], r["origin"], r["parent_id"] or "-", str(r["trials"]), success,
                                  r["status"] if r["status"] == "live" else f"retired: {r['retired_reason'] or ''}")))
    out.print(table)


@templates_app.command("show")
def show_command(template_id: str = typer.Argument(..., help="A template id, or its first characters."),
                 config: str | None = ConfigOpt) -> None:
    """A template's text, its counts, and a unified diff to its parent. Example: slmswap templates show retrieval/base@1"""
    with _store(config) as store:
        template = find_template(store, template_id)
        parent = store.get_template(template.parent_id) if template.parent_id else None
    summary = template_summary(template)
    out.print(Text(f"{template.id}  route {template.route}  origin {template.origin}  status {template.status}  "
                   f"{template.successes} successes / {template.trials} trials  created "
                   f"{template.created_at:%Y-%m-%d %H:%M}"), highlight=False)
    if summary["trials"]:
        out.print(Text(f"success {summary['success']:.1%} [{summary['low']:.1%}, {summary['high']:.1%}]"))
    out.rule("text")
    out.print(Text(template.text), highlight=False)
    if template.parent_id:
        out.rule(f"diff to parent {template.parent_id}")
        out.print(Text(parent_diff(parent.text if parent else "", template.text, template.parent_id, template.id)
                       or "(same text)"), highlight=False)


@templates_app.command("errors")
def errors_command(route: str | None = RouteOpt,
                   since: str | None = typer.Option(None, "--since", help="ISO date/time (2026-12-01) or an age: 30m, 24h, 7d."),
                   limit: int = typer.Option(2000, "--limit", min=1, help="Read at most this many newest calls."),
                   as_json: bool = JsonOpt, config: str | None = ConfigOpt) -> None:
    """Error patterns per route and template: calls with each pattern, their share, example call ids.
    Example: slmswap templates errors --route retrieval --since 7d"""
    from app.detectors import aggregate

    start = parse_since(since)
    with _store(config) as store:
        records = [c for c in store.list_calls(agent=route, limit=limit) if route is None or c.route == route]
        texts = {t.id: t.text for t in store.list_templates(route)}
        by_id = {c.id: c for c in records}
    rows = aggregate(records, (start, datetime.now(UTC) + timedelta(seconds=1)), texts)
    if as_json:
        out.print_json(json.dumps([{"route": r.route, "template_id": r.template_id, "calls": r.calls,
                                    "patterns": {k: {"count": p.count, "share": p.share, "examples": list(p.examples)}
                                                 for k, p in r.patterns.items()}} for r in rows]))
        return
    if not any(r.patterns for r in rows):
        out.print(f"no error patterns in {sum(r.calls for r in rows)} calls with an output"
                  + (f" on route {route!r}" if route else "") + (f" since {start:%Y-%m-%d %H:%M}" if since else ""))
        return
    table = Table("route", "template", "pattern", "calls", "share", "examples (call id: output)")
    for r in rows:
        for kind, stat in r.patterns.items():
            examples = "\n".join(f"{cid[:12]}: {excerpt(by_id.get(cid))}" for cid in stat.examples)
            table.add_row(*map(Text, (r.route, r.template_id or "-", kind, f"{stat.count}/{r.calls}",
                                      f"{stat.share:.0%}", examples)))
    out.print(table)


def template_summary(template: Any) -> dict[str, Any]:
    """A template row as list shows it, with its success rate and 95% Wilson interval."""
    from app.metrics import wilson

    rate = wilson(max(template.successes, 0), max(template.trials, 0))
    return {"id": template.id, "route": template.route, "origin": template.origin, "parent_id": template.parent_id,
            "status": template.status, "retired_reason": template.retired_reason, "trials": template.trials,
            "successes": template.successes, "failures": template.failures, "success": rate.rate,
            "low": rate.low, "high": rate.high, "created_at": template.created_at.isoformat()}


def find_template(store: Any, id_or_prefix: str) -> Any:
    """The template with this id, or the only one whose id starts with it; UsageError naming the fix otherwise."""
    found = store.get_template(id_or_prefix)
    if found is not None:
        return found
    matches = [t for t in store.list_templates() if t.id.startswith(id_or_prefix)] if id_or_prefix else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"{id_or_prefix!r} matches more than one template ({matches[0].id}, {matches[1].id}, ...); "
                         "give more characters")
    raise UsageError(f"no template has an id starting with {id_or_prefix!r}; see `slmswap templates list`")


def parent_diff(parent: str, child: str, parent_id: str, child_id: str) -> str:
    """The unified diff from the parent's text to the child's ('' when they are the same)."""
    lines = difflib.unified_diff(parent.splitlines(), child.splitlines(), fromfile=parent_id, tofile=child_id,
                                 lineterm="")
    return "\n".join(lines)


def parse_since(since: str | None) -> datetime:
    """`--since`: an ISO date/time (UTC unless it says otherwise) or an age (30m, 24h, 7d); None: the beginning."""
    if not since:
        return datetime.min.replace(tzinfo=UTC)
    if match := _RELATIVE.match(since.strip()):
        unit = {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    try:
        value = datetime.fromisoformat(since)
    except ValueError:
        raise UsageError(f"--since {since!r} is not a date or an age; use e.g. 2026-12-01, 2026-12-01T08:00 or 7d") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def excerpt(call: Any, width: int = 70) -> str:
    """The start of a call's output, on one line."""
    if call is None or not call.response:
        return ""
    response = call.response.get("raw") if isinstance(call.response.get("raw"), dict) else call.response
    text = response.get("content") or json.dumps(response.get("tool_calls") or "")
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _store(config: str | None):
    from app.capture.store import CaptureStore
    from app.config import load_settings

    return CaptureStore.open(load_settings(config).store.url)
