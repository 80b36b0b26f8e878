"""Auto context engineering on BFCL simple_python: the base template vs the template that detection, evolution and
selection chose, on a fresh slice, free and constrained decoding, raw and repaired, with static and dynamic examples.

    .venv/bin/python bench/context_engineering.py [--model gguf:smollm2-135m] [--evolve 20] [--test 30]
        [--test-offset 100] [--k 2] [--max-tokens 128] [--no-constrained]

Only items 0-299 are used (300-399 are the training issue's held-out split): the evolution slice is items
0..evolve-1, the test slice `test` items from `test-offset`, and the two never overlap. Per model:
1. the base template answers the evolution slice, free and constrained (the captured traffic of a route);
2. the detectors judge every answer and `prompts.evolve.evolve` writes a child from the free answers' patterns,
   with k worked examples from the calls that were valid (the constrained ones included: they are traffic too);
3. selection: the child answers the evolution slice; the template with the higher posterior mean of validity,
   Beta(valid + 1, invalid + 1), is selected (what `best(route)` does);
4. on the test slice: base vs selected, free and constrained; the selected rules with `{{examples}}` filled per
   item by BM25 over the evolution slice's valid calls (dynamic examples); and the same answers after
   `app.repair` (repaired valid / exact).
Requests, the Router (capture off) and the scores are `training/evaluate.py`'s. The last line printed is one JSON
object: base_valid, selected_valid, base_exact, selected_exact (free decoding, first model), n, and per model all
of the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from app.capture.records import request_payload
from app.config import load_settings
from app.detectors import detect
from app.repair import repair
from app.validation import parse_calls
from prompts.evolve import Example, Observation, evolve, fill_examples, quarter_findings
from prompts.examples import ExampleIndex
from training.evaluate import (EVAL_ROUTE, EvalOptions, EvalRouter, ModelRun, build_request, eval_settings,
                               item_row, run_items, score)
from training.suites import EvalItem, load_suite
from app.routing.context import CallContext

SUITE, LAST_TUNABLE = "bfcl:simple_python", 300
BASE = {"id": "bfcl/base@1", "text": "You are a helpful assistant."}


@dataclass
class Answer:
    item: EvalItem
    request: dict[str, Any]
    row: dict[str, Any]


# ---- running a template over items ------------------------------------------------------------------------

async def answer(router: EvalRouter, items: list[EvalItem], decoding: str, max_tokens: int,
                 template_for) -> list[Answer]:
    """Each item asked with `template_for(item)` (a {"id", "text"}), through evaluate's request and row."""
    answers: dict[str, Answer] = {}

    async def ask(item: EvalItem, binding: str) -> dict[str, Any]:
        template = template_for(item)
        req = build_request(item, decoding, max_tokens, template)
        resp = await router.complete(req, CallContext(route=EVAL_ROUTE, template_id=template["id"], source="eval"))
        row = item_row(item, binding, resp)
        answers[item.id] = Answer(item, request_payload(req), row)
        return row

    run = ModelRun(router.settings.default_binding)
    await run_items(run, items, ask, 1)
    if run.failure:
        raise SystemExit(f"{run.binding} failed: {run.failure}")
    return [answers[i.id] for i in items]


def observation(a: Answer) -> Observation:
    output = {"content": a.row["output"]}
    findings = detect(output, a.request) + quarter_findings(a.request, output)
    if a.row["valid"]:
        findings = [f for f in findings if f.error_type in ("copied_example", "repeated_call")]
    return Observation(a.item.id, a.request, output, tuple(findings))


def rates(answers: list[Answer]) -> dict[str, float]:
    n = len(answers) or 1
    fixed = [_repaired(a) for a in answers]
    return {"valid": sum(a.row["valid"] for a in answers) / n, "exact": sum(a.row["exact"] for a in answers) / n,
            "repaired_valid": sum(v for v, _ in fixed) / n, "repaired_exact": sum(e for _, e in fixed) / n}


def _repaired(a: Answer) -> tuple[bool, bool]:
    if a.row["valid"]:
        return True, bool(a.row["exact"])
    fixed = repair({"content": a.row["output"]}, a.request)
    if not fixed.valid_after:
        return False, False
    verdict = parse_calls(content=fixed.output.get("content"), tool_calls=fixed.output.get("tool_calls"))
    exact, _ = score(a.item, list(verdict.calls), None, fixed.output.get("content") or "")
    return True, bool(exact)


def posterior_mean(answers: list[Answer]) -> float:
    valid = sum(a.row["valid"] for a in answers)
    return (valid + 1) / (len(answers) + 2)


# ---- one model --------------------------------------------------------------------------------------------

async def bench_model(binding: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = eval_settings(load_settings(None), binding)
    routers = {d: EvalRouter(settings, d) for d in ("free", "constrained")}
    evo_items = load_suite(SUITE, offset=0, limit=args.evolve).items
    test_items = load_suite(SUITE, offset=args.test_offset, limit=args.test).items
    decodings = ("free",) if args.no_constrained else ("free", "constrained")
    started, log = time.perf_counter(), _logger(binding)
    base = lambda item: BASE  # noqa: E731

    evo = {d: await answer(routers[d], evo_items, d, args.max_tokens, base) for d in decodings}
    log(f"base on the evolution slice: " + ", ".join(f"{d} {rates(evo[d])['valid']:.0%} valid" for d in decodings))
    observed = [observation(a) for a in evo["free"]]
    pool = [o for d in decodings for o in map(observation, evo[d]) if not o.failed]
    static = evolve(BASE["text"], observed + pool, k=args.k)
    if static.text is None:
        log(static.reason)
        child = None
    else:
        child = {"id": "bfcl/evolved@1", "text": static.text}
        log(f"evolved: {static.reason}\n{static.text}\n")
    child_evo = await answer(routers["free"], evo_items, "free", args.max_tokens, lambda i: child) if child else []
    scores = {"base": posterior_mean(evo["free"])} | ({"evolved": posterior_mean(child_evo)} if child else {})
    selected = child if child and scores["evolved"] > scores["base"] else BASE
    log(f"selection (posterior mean of validity on the evolution slice): {scores} -> {selected['id']}")

    index = ExampleIndex(Example(o.request["messages"][-1]["content"], o.output["content"], o.call_id) for o in pool)
    dynamic_text = evolve(BASE["text"], observed, k=0, dynamic=True).text or BASE["text"] + "\n\n{{examples}}"

    def dynamic(item: EvalItem) -> dict[str, str]:
        query = item.messages[-1]["content"] if item.messages else ""
        return {"id": "bfcl/dynamic@1", "text": fill_examples(dynamic_text, index.nearest(query, args.k))}

    result: dict[str, Any] = {"n": len(test_items), "evolve_n": len(evo_items), "selected": selected["id"],
                              "rules": [r.text for r in static.rules], "static_examples": len(static.examples)}
    for d in decodings:
        base_answers = await answer(routers[d], test_items, d, args.max_tokens, base)
        sel_answers = base_answers if selected is BASE else \
            await answer(routers[d], test_items, d, args.max_tokens, lambda i: selected)
        dyn_answers = await answer(routers[d], test_items, d, args.max_tokens, dynamic)
        for name, answers in (("base", base_answers), ("selected", sel_answers), ("dynamic", dyn_answers)):
            for key, value in rates(answers).items():
                result[f"{d}_{name}_{key}"] = round(value, 4)
        log(f"test slice, {d}: " + ", ".join(f"{n} {result[f'{d}_{n}_valid']:.0%} valid "
                                             f"{result[f'{d}_{n}_exact']:.0%} exact"
                                             for n in ("base", "selected", "dynamic")))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _logger(binding: str):
    return lambda text: print(f"[{binding}] {text}", file=sys.stderr, flush=True)


# ---- report -----------------------------------------------------------------------------------------------

def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | decoding | template | valid | exact | repaired valid | repaired exact |",
             "|---|---|---|---|---|---|---|"]
    for binding, r in results.items():
        for d in ("free", "constrained"):
            for name in ("base", "selected", "dynamic"):
                if f"{d}_{name}_valid" in r:
                    cells = [f"{r[f'{d}_{name}_{k}']:.0%}" for k in ("valid", "exact", "repaired_valid",
                                                                      "repaired_exact")]
                    label = {"base": "base", "selected": f"selected ({r['selected']})",
                             "dynamic": "rules + dynamic examples"}[name]
                    lines.append(f"| {binding} | {d} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check(args: argparse.Namespace) -> None:
    if args.evolve < 1 or args.test < 1 or args.evolve > args.test_offset:
        raise SystemExit("--evolve and --test must be at least 1, and the test slice must start after the "
                         "evolution slice (--test-offset >= --evolve)")
    if args.test_offset + args.test > LAST_TUNABLE:
        raise SystemExit(f"the test slice ends at {args.test_offset + args.test}; only items 0-{LAST_TUNABLE - 1} "
                         "may be used (300-399 are held out for the training issue)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="binding (repeatable); default gguf:smollm2-135m")
    parser.add_argument("--evolve", type=int, default=20, help="items 0..N-1 are the evolution slice")
    parser.add_argument("--test", type=int, default=30, help="items in the fresh test slice")
    parser.add_argument("--test-offset", type=int, default=100, help="first item of the test slice")
    parser.add_argument("--k", type=int, default=2, help="worked examples per template")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-constrained", action="store_true", help="free decoding only")
    args = parser.parse_args(argv)
    check(args)
    results = {m: asyncio.run(bench_model(m, args)) for m in args.model or ["gguf:smollm2-135m"]}
    print(table(results))
    first = next(iter(results.values()))
    summary = {"base_valid": first["free_base_valid"], "selected_valid": first["free_selected_valid"],
               "base_exact": first["free_base_exact"], "selected_exact": first["free_selected_exact"],
               "n": first["n"], "models": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
