"""The demo queries through the real workflow before and after template evolution: how many answers are RIGHT
(checked against the sales database itself), not only how many calls were valid.

    .venv/bin/python bench/workflow_before_after.py [--binding gguf:smollm2-135m] [--rounds 1]

In a fresh store: each query runs on the base templates (round "before"), `prompts.cli_evolve.evolve_routes`
writes a child per route from those calls, the children are made the active templates, and each query runs
again (round "after"). A query's answer is right when its check holds: the figures it must state, computed by
SQL on the same sales database the agents query. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.capture.store import CaptureStore
from app.config import load_settings
from graphs.runner import run_workflow
from prompts.cli_evolve import evolve_routes


def figures(db: str) -> dict[str, dict[str, Any]]:
    """Each demo query and what a right answer states (computed from the data, never typed in)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    q4 = con.execute("SELECT region, SUM(amount) FROM sales WHERE month >= '2025-10' GROUP BY region "
                     "ORDER BY 2 DESC").fetchall()
    top = con.execute("SELECT product, SUM(amount) FROM sales WHERE month >= '2025-10' GROUP BY product "
                      "ORDER BY 2 DESC LIMIT 5").fetchall()
    con.close()
    return {
        "Analyze Q4 sales by region and write a short report": {"regions": [r for r, _ in q4],
                                                                 "amounts": [a for _, a in q4]},
        "Top 5 products by revenue in Q4": {"regions": [p for p, _ in top], "amounts": [a for _, a in top[:1]]},
    }


def right(answer: str, expected: dict[str, Any]) -> bool:
    """Every name appears and the leading amount is stated (to the unit, with or without thousands separators)."""
    text = answer.replace(",", "")
    names = all(n.lower() in answer.lower() for n in expected["regions"])
    return names and all(str(int(round(a))) in text or f"{a:.2f}" in text for a in expected["amounts"][:1])


def run_round(queries: dict[str, dict], config: str, binding: str | None, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for query, expected in queries.items():
        for _ in range(rounds):
            result = run_workflow(query, config_path=config, binding=binding)
            calls = result["calls"]
            rows.append({"query": query, "right": right(result["answer"], expected),
                         "valid_calls": sum(c["valid"] for c in calls), "calls": len(calls),
                         "answer": result["answer"][:300]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def activate_children(url: str, outcomes: list) -> list[str]:
    """Make each written child what its route's runs use: its parent is retired, so the child is the one live
    template selection can draw (a bench shortcut for the trials selection would otherwise spend)."""
    from prompts.store import retire

    made = []
    with CaptureStore.open(url) as store:
        for o in outcomes:
            if o.written and o.parent_id:
                retire(store, o.parent_id, "bench: replaced by its evolved child")
                made.append(o.written[0])
    return made


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binding", default=None, help="every route on this binding (default: the config's)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per query and round")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="slmswap-demo-"))
    url = f"sqlite:///{work / 'capture.db'}"
    config = work / "slmswap.toml"
    config.write_text(f'[store]\nurl = "{url}"\n[workflow]\ndata_db = "{work / "sales.db"}"\n', encoding="utf-8")
    settings = load_settings(str(config))
    before = run_round(_queries(settings), str(config), args.binding, args.rounds)
    with CaptureStore.open(url) as store:
        outcomes = evolve_routes(store, None, settings.evolve.examples, None, settings)
    for o in outcomes:
        print(f"[evolve] {o.route}: {o.evolution.reason}; " + "; ".join(r.text for r in o.evolution.rules),
              file=sys.stderr, flush=True)
    activated = activate_children(url, outcomes)
    after = run_round(_queries(settings), str(config), args.binding, args.rounds)
    summary = {"n": len(before), "before_right": sum(r["right"] for r in before),
               "after_right": sum(r["right"] for r in after),
               "before_valid_calls": f"{sum(r['valid_calls'] for r in before)}/{sum(r['calls'] for r in before)}",
               "after_valid_calls": f"{sum(r['valid_calls'] for r in after)}/{sum(r['calls'] for r in after)}",
               "evolved": activated}
    print(json.dumps(summary))
    return summary


def _queries(settings) -> dict[str, dict]:
    from agents.tools import ensure_sales_db  # the sample database the agents query, made on first use

    return figures(str(ensure_sales_db(Path(settings.workflow.data_db))))


if __name__ == "__main__":
    main()
