"""`slmswap dataset …`: training sets from the capture store, BFCL's ground truth or a Langfuse dataset, written to a
folder; and the store's selection pushed to Langfuse as a dataset.

Each command parses, calls `training/datasets.py`, prints counts. Bad input raises UsageError (exit 2 through
`app.cli.main`) before anything is written. The lead registers it: `app.add_typer(dataset_app, name="dataset")`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.errors import UsageError

dataset_app = typer.Typer(no_args_is_help=True, help="Build training sets (SFT rows and DPO pairs).")
out = Console()
if not out.is_terminal:
    out.width = 200

ConfigOpt = typer.Option(None, "--config", "-c", help="slmswap.toml to read (default: $SLMSWAP_CONFIG or ./slmswap.toml).")
OutOpt = typer.Option(..., "--out", "-o", help="Folder to write (a new one, or an earlier dataset's).")
FormatOpt = typer.Option("hermes", "--format", "-f", help="hermes (ShareGPT conversations) or openai (messages + tools).")
ValOpt = typer.Option(10, "--val-percent", help="Share of inputs (by hash) in the val split, 0-50.")
RouteOpt = typer.Option(None, "--route", "-r", help="Only this route; repeat for more (default: every route).")


@dataset_app.command("build")
def build(
    route: list[str] = RouteOpt,
    fmt: str = FormatOpt,
    min_examples: int = typer.Option(100, "--min-examples", help="Refuse to write fewer examples than this."),
    cap: int | None = typer.Option(None, "--max-per-route", min=1, help="Keep at most N examples per route."),
    val_percent: int = ValOpt,
    out_dir: str = OutOpt,
    config: str | None = ConfigOpt,
) -> None:
    """SFT rows from captured calls: valid teacher answers, and student answers confirmed by agreement or
    positive feedback; never eval or held-out calls. Example: slmswap dataset build --route retrieval --out ds/"""
    from training import datasets as ds

    target = _check_args(fmt, val_percent, out_dir)
    calls, verdicts = _captured(config)
    sel = ds.select(calls, verdicts, routes=route or None, cap=cap)
    if len(sel.kept) < min_examples:
        raise UsageError(f"only {len(sel.kept)} examples to write ({_tally(sel.dropped) or 'nothing dropped'}); "
                         f"--min-examples is {min_examples}: capture more calls or lower --min-examples")
    splits = ds.split(sel.kept, val_percent)
    rows = {name: [ds.ROW_WRITERS[fmt](ex) for ex in exs] for name, exs in splits.items()}
    ds.write_dataset(target, rows, fmt, {"source": "store", "routes": sorted(route or []),
                                        "val_percent": val_percent, "dropped": dict(sel.dropped),
                                        "invalid_error_types": dict(sel.invalid_types)})
    _print_counts(splits, target)
    _print_counter("dropped", "reason", sel.dropped)
    _print_counter("invalid calls dropped", "error type", sel.invalid_types)


@dataset_app.command("pairs")
def pairs(
    route: list[str] = RouteOpt,
    min_examples: int = typer.Option(1, "--min-examples", help="Refuse to write fewer pairs than this."),
    val_percent: int = ValOpt,
    out_dir: str = OutOpt,
    config: str | None = ConfigOpt,
) -> None:
    """DPO pairs (prompt, chosen = the teacher's valid answer, rejected = the student's failed one) from fallbacks
    and shadow disagreements. Example: slmswap dataset pairs --route retrieval --out pairs/"""
    from training import datasets as ds

    target = _check_args("hermes", val_percent, out_dir)
    calls, verdicts = _captured(config)
    found = ds.preference_pairs(calls, verdicts, routes=route or None)
    if len(found) < min_examples:
        raise UsageError(f"only {len(found)} preference pairs (fallbacks and shadow disagreements outside eval and "
                         f"the held-out split); --min-examples is {min_examples}: capture more or lower it")
    splits = ds.split(found, val_percent, key=lambda p: p.example.key)
    rows = {name: [ds.to_pair(p) for p in ps] for name, ps in splits.items()}
    why = Counter(p.why for p in found)
    ds.write_dataset(target, rows, "pairs", {"source": "store", "routes": sorted(route or []),
                                            "val_percent": val_percent, "rejected_error_types": dict(why)})
    _print_counts({name: [p.example for p in ps] for name, ps in splits.items()}, target)
    _print_counter("rejected answers", "error type", why)


@dataset_app.command("from-bfcl")
def from_bfcl(
    category: str = typer.Option("simple_python", "--category", help="A BFCL single-turn category."),
    items: str = typer.Option("0-299", "--items", help="Item positions FIRST-LAST, both included (300-399 of "
                                                       "simple_python are held out and refused)."),
    fmt: str = FormatOpt,
    val_percent: int = ValOpt,
    out_dir: str = OutOpt,
) -> None:
    """BFCL's ground truth (each parameter at its first allowed value) as training rows.

    Example: slmswap dataset from-bfcl --category simple_python --items 0-299 --out bfcl-train/
    """
    from training import datasets as ds

    target = _check_args(fmt, val_percent, out_dir)
    examples = ds.bfcl_examples(category, ds.parse_items(items))
    splits = ds.split(examples, val_percent)
    rows = {name: [ds.ROW_WRITERS[fmt](ex) for ex in exs] for name, exs in splits.items()}
    ds.write_dataset(target, rows, fmt, {"source": f"bfcl:{category}", "items": items, "val_percent": val_percent})
    _print_counts(splits, target)


@dataset_app.command("check")
def check(folder: str = typer.Argument(..., help="A dataset folder written by build, pairs or from-bfcl.")) -> None:
    """Validate every row of a dataset folder (path:line of the first bad one). Example: slmswap dataset check ds/"""
    from training.datasets import read_dataset

    loaded = read_dataset(folder)
    counts = ", ".join(f"{name} {len(rows)}" for name, rows in loaded.splits.items())
    out.print(Text(f"{folder}: {loaded.kind} rows, {counts}; every row is well-formed"), highlight=False)


@dataset_app.command("push-langfuse")
def push_langfuse(
    name: str = typer.Option(..., "--name", "-n", help="The Langfuse dataset to create or update."),
    route: list[str] = RouteOpt,
    cap: int | None = typer.Option(None, "--max-per-route", min=1, help="Push at most N examples per route."),
    config: str | None = ConfigOpt,
) -> None:
    """The calls `build` would keep, as the items of a Langfuse dataset (input, expected output, route, template,
    binding, call id); a re-push updates the same items. Example: slmswap dataset push-langfuse --name retrieval-v1"""
    from app.config import load_settings
    from training import datasets as ds
    from training.langfuse_datasets import push_dataset

    calls, verdicts = _captured(config)
    sel = ds.select(calls, verdicts, routes=route or None, cap=cap)
    if not sel.kept:
        raise UsageError(f"no calls to push ({_tally(sel.dropped) or 'the store has none'}); capture more calls "
                         "or widen --route")
    report = push_dataset(load_settings(config), name, sel.kept, {c.id: c for c in calls})
    out.print(Text(f"pushed {report.pushed} items to dataset {name!r} at {report.host}"), highlight=False)
    _print_counter("pushed", "route", report.routes)
    _print_counter("dropped", "reason", sel.dropped)


@dataset_app.command("pull-langfuse")
def pull_langfuse(
    name: str = typer.Option(..., "--name", "-n", help="The Langfuse dataset to read."),
    fmt: str = FormatOpt,
    min_examples: int = typer.Option(1, "--min-examples", help="Refuse to write fewer examples than this."),
    val_percent: int = ValOpt,
    out_dir: str = OutOpt,
    config: str | None = ConfigOpt,
) -> None:
    """A Langfuse dataset as a dataset folder like `build` writes; items without an expected output or with an
    input that does not parse are dropped and counted. Example: slmswap dataset pull-langfuse --name faq --out ds/"""
    from app.config import load_settings
    from training.langfuse_datasets import pull_dataset

    target = _check_args(fmt, val_percent, out_dir)
    report = pull_dataset(load_settings(config), name, target, fmt, val_percent=val_percent,
                          min_examples=min_examples)
    _print_counts(report.splits, target)
    _print_counter("dropped", "reason", report.dropped)


# ---- helpers ---------------------------------------------------------------------------------------------

def _check_args(fmt: str, val_percent: int, out_dir: str) -> Path:
    from training.datasets import FORMATS, MANIFEST

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is unknown; use one of: {', '.join(FORMATS)}")
    if not 0 <= val_percent <= 50:
        raise UsageError(f"--val-percent must be between 0 and 50, got {val_percent}")
    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).exists())):
        raise UsageError(f"--out {out_dir} exists and is not a dataset folder; give a new or empty folder "
                         "(nothing is overwritten but an earlier dataset)")
    return target


def _captured(config: str | None) -> tuple[list[Any], dict[str, bool]]:
    """Every captured call, and the feedback verdict per call id."""
    from sqlalchemy import select

    from app.capture.engine import open_engine
    from app.capture.schema import feedback
    from app.capture.store import CaptureStore
    from app.config import load_settings
    from training.datasets import feedback_verdicts

    url = load_settings(config).store.url
    with CaptureStore.open(url) as store:
        calls = store.list_calls(limit=2**62)
    # CaptureStore has no reader for feedback rows yet; read its table directly (read-only).
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(feedback.c.call_id, feedback.c.score, feedback.c.success)).all()
    finally:
        engine.dispose()
    return calls, feedback_verdicts(tuple(r) for r in rows)


def _tally(counts: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common())


def _print_counts(splits: dict[str, list[Any]], target: Path) -> None:
    table = Table(title=f"written to {target}")
    for column in ("split", "route", "examples"):
        table.add_column(column)
    for name, exs in splits.items():
        for route, n in sorted(Counter(ex.route for ex in exs).items()):
            table.add_row(Text(name), Text(route), Text(str(n)))
        table.add_row(Text(name), Text("(all)"), Text(str(len(exs))))
    out.print(table)


def _print_counter(title: str, column: str, counts: Counter) -> None:
    if not counts:
        return
    table = Table(title=title)
    table.add_column(column)
    table.add_column("calls")
    for key, n in counts.most_common():
        table.add_row(Text(str(key)), Text(str(n)))
    out.print(table)
