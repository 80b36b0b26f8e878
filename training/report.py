"""What an evaluation run reports: the per-model summary (rates with Wilson intervals, gaps to the first model),
summary.json, report.md and report.png, the progress bars and the table the CLI prints.

Definitions (per model, over the items it answered): valid_rate = share the Router judged valid; exact_rate =
share scored exact (BFCL's rule for bfcl suites, the answer check for workflow ones); arg_f1 = mean item f1;
p50_latency_ms = median item latency; tokens = prompt + completion tokens summed; cost_usd summed; error_types
counts the invalid items by error type. A gap is model minus reference (the first model) in rate points, and
model / reference for latency.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.secrets import redact_text
from training.metrics import wilson

RATES = (("valid_rate", "valid"), ("exact_rate", "exact"), ("arg_f1", "arg F1"))


# ---- summary (pure) --------------------------------------------------------------------------------------

def model_summary(rows: list[dict[str, Any]], failure: str | None = None) -> dict[str, Any]:
    """The summary.json entry of one model from its items.jsonl rows."""
    n = len(rows)
    valid = wilson(sum(bool(r["valid"]) for r in rows), n)
    exact = wilson(sum(bool(r["exact"]) for r in rows), n)
    errors = Counter(r["error_type"] or "unknown" for r in rows if not r["valid"])
    out = {"n": n, "valid_rate": valid.rate, "exact_rate": exact.rate,
           "arg_f1": sum(r["f1"] for r in rows) / n if n else 0.0,
           "p50_latency_ms": statistics.median(r["latency_ms"] for r in rows) if n else 0.0,
           "tokens": sum(r["tokens"] for r in rows), "cost_usd": sum(r["cost"] for r in rows),
           "error_types": dict(errors.most_common()), "valid_ci": [valid.low, valid.high],
           "exact_ci": [exact.low, exact.high], "failed": failure}
    if rows and "routed" in rows[0]:
        routed = wilson(sum(bool(r["routed"]) for r in rows), n)
        out.update(routing_accuracy=routed.rate, routing_ci=[routed.low, routed.high],
                   workflow_success=exact.rate)
    return out


def gap(model: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Model minus reference for the rates; model / reference for p50 latency (None when undefined)."""
    out = {key: model[key] - reference[key] for key, _ in RATES}
    if "routing_accuracy" in model and "routing_accuracy" in reference:
        out["routing_accuracy"] = model["routing_accuracy"] - reference["routing_accuracy"]
    ref_ms = reference["p50_latency_ms"]
    out["p50_latency_ratio"] = model["p50_latency_ms"] / ref_ms if ref_ms else None
    return out


def summarize(suite: Any, runs: list[Any], options: Any) -> dict[str, Any]:
    """summary.json: the spec keys (`suite`, `models`), then the reference, gaps, failures and run settings."""
    models = {run.binding: model_summary(run.rows, run.failure) for run in runs}
    reference = runs[0].binding
    gaps = {b: gap(m, models[reference]) for b, m in models.items() if b != reference}
    return {"suite": suite.name, "models": models, "reference": reference, "gaps": gaps,
            "failed": {run.binding: run.failure for run in runs if run.failure},
            "items": len(suite.items), "offset": options.offset, "limit": options.limit,
            "decoding": options.decoding, "max_tokens": options.max_tokens, "template": options.template,
            "notes": suite.notes, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---- files -----------------------------------------------------------------------------------------------

def write_report(out: Path, suite: Any, runs: list[Any], options: Any) -> dict[str, Any]:
    """Write summary.json, report.md and report.png into `out`; returns the summary."""
    summary = summarize(suite, runs, options)
    # Bindings and failures are redacted where they are made; this is the last look before the files.
    (out / "summary.json").write_text(redact_text(json.dumps(summary, indent=2)) + "\n", encoding="utf-8")
    (out / "report.md").write_text(redact_text(format_markdown(summary)), encoding="utf-8")
    plot(summary, out / "report.png")
    return summary


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def _ci(ci: list[float]) -> str:
    return f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _points(diff: float) -> str:
    return f"{100 * diff:+.1f} pts"


def format_markdown(summary: dict[str, Any]) -> str:
    """report.md: settings, the metrics table, gaps to the reference, error types, failures and notes."""
    end = summary["offset"] + summary["items"] - 1
    lines = [f"# Evaluation of `{summary['suite']}`", "",
             f"Items {summary['offset']}-{end} ({summary['items']}), decoding {summary['decoding']}, max_tokens "
             f"{summary['max_tokens']}, template {summary['template'] or 'none'}; {summary['created']}.", "",
             *_metrics_table(summary["models"]), ""]
    if summary["gaps"]:
        lines += [f"## Gap to the reference `{summary['reference']}`", "", *_gap_table(summary["gaps"]), ""]
    lines += ["## Error types (invalid items)", "", *_error_table(summary["models"]), ""]
    if summary["failed"]:
        lines += ["## Failures", "", *(f"- `{b}`: {why}" for b, why in summary["failed"].items()), ""]
    if summary["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in summary["notes"]), ""]
    lines += ["Rates with 95% Wilson intervals in brackets.", "", "![metrics and error types](report.png)", ""]
    return "\n".join(lines)


def _metrics_table(models: dict[str, dict]) -> list[str]:
    routing = any("routing_accuracy" in m for m in models.values())
    head = "| model | n | valid | exact | arg F1 |" + (" routing |" if routing else "") + " p50 ms | tokens | cost $ |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for binding, m in models.items():
        cells = [f"`{binding}`" + (" (failed)" if m["failed"] else ""), str(m["n"]),
                 f"{_pct(m['valid_rate'])} {_ci(m['valid_ci'])}", f"{_pct(m['exact_rate'])} {_ci(m['exact_ci'])}",
                 f"{m['arg_f1']:.3f}"]
        if routing:
            cells.append(f"{_pct(m['routing_accuracy'])} {_ci(m['routing_ci'])}" if "routing_ci" in m else "-")
        cells += [f"{m['p50_latency_ms']:.0f}", str(m["tokens"]), f"{m['cost_usd']:.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _gap_table(gaps: dict[str, dict]) -> list[str]:
    rows = ["| model | valid | exact | arg F1 | p50 latency |", "|---|---|---|---|---|"]
    for binding, g in gaps.items():
        ratio = f"{g['p50_latency_ratio']:.2f}x" if g["p50_latency_ratio"] is not None else "-"
        rows.append(f"| `{binding}` | {_points(g['valid_rate'])} | {_points(g['exact_rate'])} | "
                    f"{g['arg_f1']:+.3f} | {ratio} |")
    return rows


def _error_table(models: dict[str, dict]) -> list[str]:
    rows = ["| model | error type | items |", "|---|---|---|"]
    rows += [f"| `{b}` | {etype} | {count} |" for b, m in models.items() for etype, count in m["error_types"].items()]
    return rows if len(rows) > 2 else ["None: every answered item was valid."]


# ---- figure ----------------------------------------------------------------------------------------------

def plot(summary: dict[str, Any], path: Path) -> None:
    """report.png: grouped bars per metric and model (with Wilson intervals), error types stacked per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    _plot_metrics(left, summary["models"])
    _plot_errors(right, summary["models"])
    fig.suptitle(f"{summary['suite']}: {summary['items']} items, decoding {summary['decoding']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _metrics(models: dict[str, dict]) -> list[tuple[str, str, str | None]]:
    """(summary key, label, interval key) of the bars to draw."""
    out = [("valid_rate", "valid", "valid_ci"), ("exact_rate", "exact", "exact_ci"), ("arg_f1", "arg F1", None)]
    if any("routing_accuracy" in m for m in models.values()):
        out.append(("routing_accuracy", "routing", "routing_ci"))
    return out


def _plot_metrics(ax: Any, models: dict[str, dict]) -> None:
    metrics, names = _metrics(models), list(models)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        m = models[name]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        values = [m.get(key, 0.0) for key, _, _ in metrics]
        tops = [m[ci][1] if ci in m else v for v, (_, _, ci) in zip(values, metrics)]
        ax.bar(xs, values, width, label=name + (" (failed)" if m["failed"] else ""))
        for x, v, top, (_, _, ci) in zip(xs, values, tops, metrics):
            if ci in m:
                ax.errorbar(x, v, yerr=[[v - m[ci][0]], [top - v]], color="black", capsize=3, linewidth=1)
            ax.text(x, top + 0.015, f"{100 * v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(metrics)), [label for _, label, _ in metrics])
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("rate, % on top (whiskers: 95% Wilson interval)")
    ax.legend(fontsize=8, loc="upper center", ncol=min(len(names), 3))
    ax.set_title("metrics per model")


def _plot_errors(ax: Any, models: dict[str, dict]) -> None:
    names = list(models)
    types = sorted({t for m in models.values() for t in m["error_types"]})
    from matplotlib import colormaps

    palette = colormaps["Set2"]  # not the models' colours: these are error types
    bottom = [0] * len(names)
    for k, etype in enumerate(types):
        counts = [models[n]["error_types"].get(etype, 0) for n in names]
        ax.bar(range(len(names)), counts, 0.6, bottom=bottom, label=etype, color=palette(k % palette.N))
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xticks(range(len(names)), [_short(n) for n in names], fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("invalid items")
    ax.set_ylim(0, max([*bottom, 1]) * 1.4)
    if types:
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    else:
        ax.text(0.5, 0.5, "no invalid items", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("error types (stacked)")


def _short(binding: str, width: int = 22) -> str:
    return binding if len(binding) <= width else binding[: width - 1] + "…"


# ---- console ---------------------------------------------------------------------------------------------

@contextmanager
def model_progress(console: Any, models: tuple[str, ...], total: int) -> Iterator[Any]:
    """A rich progress bar per model; yields `advance(binding)`. No console: no bars."""
    if console is None:
        yield lambda binding: None
        return
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        # escape: rich would read "[redacted]" as a markup tag and drop it
        tasks = {m: progress.add_task(escape(redact_text(m)), total=total) for m in models}
        yield lambda binding: progress.advance(tasks[binding])


def print_summary(summary: dict[str, Any], out: Path, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{summary['suite']} ({summary['items']} items, {summary['decoding']})")
    for column in ("model", "n", "valid", "exact", "arg F1", "p50 ms", "tokens", "cost $", "errors"):
        table.add_column(column, justify="left" if column in ("model", "errors") else "right")
    for binding, m in summary["models"].items():
        errors = ", ".join(f"{t} {c}" for t, c in m["error_types"].items()) or "-"
        table.add_row(escape(binding) + (" [red](failed)[/red]" if m["failed"] else ""), str(m["n"]),
                      _pct(m["valid_rate"]), _pct(m["exact_rate"]), f"{m['arg_f1']:.3f}",
                      f"{m['p50_latency_ms']:.0f}", str(m["tokens"]), f"{m['cost_usd']:.4f}", errors)
    console.print(table)
    console.print(f"wrote {out}/items.jsonl, summary.json, report.md, report.png", highlight=False)
