"""The `slmswap` command line: each command parses, calls one function, prints.

Heavy libraries (llama_cpp, torch, langgraph) are imported inside commands, so `--help` is instant.
Exit codes: 0 ok, 1 failure, 2 bad input; a run stopped by Ctrl-C exits 130, by SIGTERM 143.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.capture.redact import redact_text
from app.cli_dataset import dataset_app
from app.cli_export import export_command
from app.cli_models import loop, models_app
from app.cli_train import train_command
from app.cli_templates import templates_app
from app.cli_templates_langfuse import add_langfuse_commands
from prompts.cli_evolve import register as register_evolve  # the composition root adds prompts/' own commands
from app.errors import SlmSwapError, UsageError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="slm-swap: move LLM calls of agent workflows to small local models.")
calls_app = typer.Typer(no_args_is_help=True, help="Inspect captured model calls.")
app.add_typer(calls_app, name="calls")
runs_app = typer.Typer(no_args_is_help=True, help="Inspect workflow runs.")
app.add_typer(runs_app, name="runs")
rollout_app = typer.Typer(no_args_is_help=True, help="See and move each route's rollout stage.")
app.add_typer(rollout_app, name="rollout")
keys_app = typer.Typer(no_args_is_help=True, help="API keys for `slmswap serve`.")
app.add_typer(keys_app, name="keys")
app.add_typer(dataset_app, name="dataset")
app.add_typer(models_app, name="models")
app.command("loop")(loop)
app.command("train")(train_command)
app.command("export")(export_command)
app.add_typer(templates_app, name="templates")
add_langfuse_commands(templates_app)
register_evolve(templates_app)

out = Console()
err = Console(stderr=True)
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out.width = 200

ConfigOpt = typer.Option(None, "--config", "-c", help="slmswap.toml to read (default: $SLMSWAP_CONFIG or ./slmswap.toml).")


def main() -> None:
    """Console-script entry point: SlmSwapError becomes a one-line message and its exit code, no traceback."""
    from app.config import unknown_env_vars
    from app.secrets import install_log_redaction

    install_log_redaction()  # before anything logs: no record of this process carries a secret

    try:
        check_argv(sys.argv[1:])
        for warning in unknown_env_vars():
            warn(warning)
        app()
    except SlmSwapError as exc:
        error(str(exc))
        sys.exit(exc.exit_code)


def error(message: str) -> None:
    """Print `message` on stderr as it is: never read as Rich markup (a binding may hold `[/x]`), and redacted."""
    err.print(Text("error: ", style="red") + Text(redact_text(message)), highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(Text("warning: ", style="yellow") + Text(redact_text(message)), highlight=False, soft_wrap=True)


def check_argv(args: list[str]) -> None:
    """UsageError naming the first argument that is not UTF-8 (Linux hands such bytes over surrogate-escaped)."""
    for number, arg in enumerate(args, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UsageError(f"argument {number} ({shown!r}) is not valid UTF-8; pass the text UTF-8 encoded") from None


@app.command()
def run(
    query: str = typer.Argument(..., help="What to ask the workflow."),
    config: str | None = ConfigOpt,
    binding: str | None = typer.Option(None, "--binding", "-b", help="Bind every route to this binding, e.g. gguf:gemma3-270m."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (answer, plan, calls, run_id)."),
) -> None:
    """Run the workflow once on QUERY and print the answer and the model calls it made.

    Example: slmswap run "Analyze Q4 sales by region and write a short report"
    """
    if not query.strip():
        raise UsageError("the query is empty; pass a question, e.g. slmswap run \"Top 5 products by revenue\"")
    from graphs.runner import run_workflow  # the CLI is the composition root: the one place app reaches up

    try:
        result = run_workflow(query, config_path=config, binding=binding, progress=None if as_json else err)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (runner.Terminated); typer would exit 130 silently
        error(f"{str(exc) or 'interrupted by the user'}; a run it started is marked interrupted (slmswap runs list)")
        raise typer.Exit(getattr(exc, "exit_code", 130)) from None
    if as_json:
        out.print_json(json.dumps(result, default=str))
    else:
        print_run(result)


def print_run(result: dict[str, Any]) -> None:
    out.print(result["answer"], markup=False, highlight=False)
    table = Table(title=f"calls of run {result['run_id']}")
    for column in ("agent", "binding", "template id", "latency ms", "tokens", "valid"):
        table.add_column(column, justify="right" if column in ("latency ms", "tokens") else "left")
    for c in result["calls"]:
        table.add_row(*_cells(c["agent"], c["binding"], c["template_id"] or "-", f"{c['latency_ms']:.0f}",
                              str(c["tokens"]), "yes" if c["valid"] else f"no ({c['error_type']})"))
    out.print(table)


@app.command()
def studio(
    port: int | None = typer.Option(None, "--port", "-p", help="Port on 127.0.0.1 (default 2024)."),
    config: str | None = ConfigOpt,
) -> None:
    """Serve the workflow to LangGraph Studio (langgraph dev) until Ctrl-C. Example: slmswap studio --port 2024"""
    from app.studio import run_studio

    raise typer.Exit(run_studio(port, config))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (anything but loopback needs API keys)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port."),
    workers: int = typer.Option(1, "--workers", "-w", help="Worker processes (each loads its own models)."),
    allow_unauthenticated: bool = typer.Option(False, "--allow-unauthenticated",
                                               help="Serve off loopback without API keys (anyone reaching it can call)."),
    config: str | None = ConfigOpt,
) -> None:
    """Serve the OpenAI-compatible proxy until Ctrl-C: point any OpenAI client's base_url at it.

    Example: slmswap serve --port 8000   then   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    """
    from app.server import serve as run_server

    run_server(host, port, workers, config, allow_unauthenticated)


@keys_app.command("new")
def keys_new() -> None:
    """Print a new API key and the hash to put in [proxy] api_keys (the config keeps only the hash)."""
    from app.server.auth import new_key

    key, digest = new_key()
    out.print(Text(f"key:  {key}\nhash: {digest}\n\n[proxy]\napi_keys = [\"{digest}\"]"), highlight=False)


@rollout_app.command("status")
def rollout_status(
    route: list[str] = typer.Option(None, "--route", "-r", help="Only these routes."),
    config: str | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per route: stage, traffic split, the student's success with its interval, fallbacks, saving.

    Example: slmswap rollout status --route retrieval
    """
    from app.config import load_settings
    from app.routing.status import route_status

    settings = load_settings(config)
    rows = route_status(settings, _store(config), list(route or []) or None)
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in rows], default=str))
        return
    table = Table()
    for column in ("route", "stage", "auto", "student", "split", "student success", "fallbacks", "saving"):
        table.add_column(column)
    for r in rows:
        fallbacks = ", ".join(f"{k} {v}" for k, v in sorted((r.cost.fallbacks if r.cost else {}).items())) or "-"
        saving = f"{r.cost.saving:.0%}" if r.cost and r.cost.saving is not None else "-"
        table.add_row(*_cells(r.route, r.stage, "yes" if r.auto else "frozen", r.student or "-",
                              f"{r.student_share:.0%} student", str(r.success) if r.student else "-", fallbacks,
                              saving))
    out.print(table)


@rollout_app.command("set")
def rollout_set(
    route: str = typer.Argument(..., help="The route (an agent's name or a proxy model name)."),
    stage: str = typer.Argument(..., help="teacher, shadow, canary, half or student."),
    student: str | None = typer.Option(None, "--student", help="Set the route's student binding too."),
    auto: bool | None = typer.Option(None, "--auto/--freeze", help="Let the gates move the stage, or freeze it."),
    config: str | None = ConfigOpt,
) -> None:
    """Move a route to STAGE now (every serving process obeys within a second). Example: slmswap rollout set retrieval shadow"""
    from app.config import load_settings
    from app.routing.routes import RouteStates

    settings = load_settings(config)
    if route not in settings.route_names():
        raise UsageError(f"no route is named {route!r}; the routes are: {', '.join(settings.route_names())}")
    states = RouteStates(settings, _store(config))
    if stage != "teacher" and student is None and states.get(route).student is None:
        raise UsageError(f"route {route!r} has no student; give one with --student gguf:<model> (or set "
                         f"[routes.{route}] student in the config)")
    moved = states.set_stage(route, stage, "set by hand (slmswap rollout set)", {"by": "cli"}, student=student,
                             auto=auto)
    out.print(Text(f"{route}: stage {moved.stage}, student {moved.student.name if moved.student else '-'}, "
                   f"{'auto' if moved.auto else 'frozen'}"), highlight=False)


@app.command()
def cost(
    since: str | None = typer.Option(None, "--since", help="Only calls since this date/time (ISO, e.g. 2026-12-01)."),
    route: str | None = typer.Option(None, "--route", "-r", help="Only this route."),
    config: str | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Spend, what the teacher alone would have cost, the saving, and calls per role. Example: slmswap cost --since 2026-12-01"""
    from datetime import UTC, datetime

    from app.cost import summarize

    try:
        start = datetime.fromisoformat(since).replace(tzinfo=UTC) if since else None
    except ValueError:
        raise UsageError(f"--since {since!r} is not a date; use ISO form, e.g. 2026-12-01 or 2026-12-01T08:00") from None
    rows = summarize(_store(config).usage_summary(start, route))
    if as_json:
        out.print_json(json.dumps([{**r.__dict__, "saving": r.saving} for r in rows]))
        return
    table = Table(caption="counterfactual: the teacher's price on the answers' own token counts (an estimate)")
    for column in ("route", "spend $", "teacher would cost $", "saving", "teacher", "student", "shadow", "fallbacks"):
        table.add_column(column)
    for r in rows:
        table.add_row(*_cells(r.route, f"{r.spend:.4f}", f"{r.counterfactual:.4f}",
                              f"{r.saving:.0%}" if r.saving is not None else "-", str(r.calls.get("teacher", 0)),
                              str(r.calls.get("student", 0)), str(r.calls.get("shadow", 0)),
                              ", ".join(f"{k} {v}" for k, v in sorted(r.fallbacks.items())) or "-"))
    out.print(table)


@app.command("eval")
def eval_cmd(
    suite: str = typer.Option(..., "--suite", "-s", help="bfcl:<category>, captured:<agent>, jsonl:<path> or workflow:<path>."),
    model: list[str] = typer.Option(..., "--model", "-m", help="A binding to evaluate; repeat for more (the first is the reference)."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate at most N items."),
    offset: int = typer.Option(0, "--offset", help="Skip the first K items."),
    decoding: str = typer.Option("constrained", "--decoding", help="constrained (grammar for local models) or free."),
    template: str | None = typer.Option(None, "--template", help="A template id to use as the system prompt."),
    out_dir: str | None = typer.Option(None, "--out", help="Output folder (default .slmswap/eval/<suite>-<time>)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Token limit per answer."),
    config: str | None = ConfigOpt,
) -> None:
    """Score models on a suite; writes items.jsonl, summary.json, report.md and report.png to --out.

    Example: slmswap eval --suite bfcl:simple_python --model gguf:smollm2-135m --limit 50 --out /tmp/e
    """
    from training.evaluate import EvalOptions, run_eval

    options = EvalOptions(suite=suite, models=tuple(model), limit=limit, offset=offset, decoding=decoding,
                          template=template, out=out_dir, config=config, max_tokens=max_tokens)
    run_eval(options, console=out, progress=err)


@calls_app.command("list")
def calls_list(
    agent: str | None = typer.Option(None, "--agent", help="Only this agent's calls."),
    limit: int = typer.Option(20, "--limit", min=1, help="How many, newest first."),
    config: str | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List captured calls, newest first. Example: slmswap calls list --agent retrieval --limit 5"""
    from app.capture.records import call_summary

    rows = _store(config).list_calls(agent=agent, limit=limit)
    if as_json:
        out.print_json(json.dumps([call_summary(c) for c in rows], default=str))
        return
    table = Table()
    for column in ("id", "created", "agent", "binding", "template", "ms", "tokens", "valid"):
        table.add_column(column)
    for c in rows:
        s = call_summary(c)
        table.add_row(*_cells(c.id[:12], c.created_at.strftime("%Y-%m-%d %H:%M:%S"), s["agent"], s["binding"],
                              s["template_id"] or "-", f"{s['latency_ms']:.0f}", str(s["tokens"]),
                              "yes" if c.valid else f"no ({c.error_type})"))
    out.print(table)


@calls_app.command("show")
def calls_show(call_id: str = typer.Argument(..., help="A call id or a unique prefix of one."),
               config: str | None = ConfigOpt) -> None:
    """Show one captured call in full (request, response, verdict) as JSON. Example: slmswap calls show 3f9a"""
    from dataclasses import asdict

    out.print_json(json.dumps(asdict(_store(config).get_call(call_id)), default=str))


@calls_app.command("stats")
def calls_stats(config: str | None = ConfigOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Per agent: calls, valid %, p50 latency. Example: slmswap calls stats"""
    from dataclasses import asdict

    stats = _store(config).stats()
    if as_json:
        out.print_json(json.dumps([asdict(s) for s in stats]))
        return
    table = Table()
    for column in ("agent", "calls", "valid %", "p50 ms"):
        table.add_column(column)
    for s in stats:
        table.add_row(*_cells(s.agent or "-", str(s.calls), f"{100 * s.valid_rate:.1f}", f"{s.p50_latency_ms:.0f}"))
    out.print(table)


@runs_app.command("list")
def runs_list(
    limit: int = typer.Option(20, "--limit", min=1, help="How many, newest first."),
    config: str | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List workflow runs, newest first; a run whose process was killed shows as died. Example: slmswap runs list"""
    from dataclasses import asdict

    rows = _store(config).list_runs(limit=limit)
    if as_json:
        out.print_json(json.dumps([asdict(r) for r in rows], default=str))
        return
    table = Table()
    for column in ("id", "started", "status", "query"):
        table.add_column(column)
    for r in rows:
        table.add_row(*_cells(r.id[:12], r.started_at.strftime("%Y-%m-%d %H:%M:%S"), r.status, r.query[:60]))
    out.print(table)


def _cells(*values: str) -> list[Text]:
    # A plain str cell is read as Rich markup; agents, bindings and template ids are the user's own text.
    return [Text(v) for v in values]


def _store(config: str | None):
    from app.capture.store import CaptureStore
    from app.config import load_settings

    return CaptureStore.open(load_settings(config).store.url)


if __name__ == "__main__":  # python -m app.cli
    main()
