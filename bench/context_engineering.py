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
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from app.capture.records import request_payload
from app.config import load_settings
from app.detectors import detect
from app.repair import repair
from app.validation import parse_calls
from prompts.evolve import EXAMPLES_VAR, Observation, evolve, example_of, quarter_findings
from prompts.examples import ExampleIndex, with_example_turns
from prompts.store import fill_tools
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

Prepare = Callable[[EvalItem], tuple[dict[str, str], EvalItem]]  # item -> (template {"id", "text"}, item to send)


def rendered(template: dict[str, str], index: ExampleIndex | None, k: int) -> Prepare:
    """A template made ready per item: `{{tools}}` filled with the item's tool list (what the prompt layer does),
    `{{examples}}` with the k most similar valid calls as conversation turns (the item's own answer excluded)."""

    def prepare(item: EvalItem) -> tuple[dict[str, str], EvalItem]:
        text = fill_tools(template["text"], item.tools, item.tool_choice)  # the one rule: app.hermes.system_with_tools
        if EXAMPLES_VAR in text:
            query = next((m["content"] for m in reversed(item.messages) if m["role"] == "user"), "")
            shots = index.nearest(query, k, exclude=item.id) if index is not None else []
            text = text.replace(EXAMPLES_VAR, "").strip()
            item = dataclasses.replace(item, messages=with_example_turns(item.messages, shots))
        return {"id": template["id"], "text": text}, item

    return prepare


async def answer(router: EvalRouter, items: list[EvalItem], decoding: str, max_tokens: int,
                 prepare: Prepare) -> list[Answer]:
    """Each item asked as `prepare` makes it, through evaluate's request and row."""
    answers: dict[str, Answer] = {}

    async def ask(item: EvalItem, binding: str) -> dict[str, Any]:
        template, sent = prepare(item)
        req = build_request(sent, decoding, max_tokens, template)
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
    """Mean of Beta(valid + 1, invalid + 1): what selection ranks templates by."""
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
    ask = lambda d, items, t: answer(routers[d], items, d, args.max_tokens, rendered(t, index, args.k))  # noqa: E731

    index = ExampleIndex()
    evo = {d: await ask(d, evo_items, BASE) for d in decodings}
    log("base on the evolution slice: " + ", ".join(f"{d} {rates(evo[d])['valid']:.0%} valid" for d in decodings))
    pool = [o for d in decodings for o in map(observation, evo[d]) if not o.failed]
    current, current_answers = BASE, evo["free"]
    scores, templates, lineage = {BASE["id"]: posterior_mean(evo["free"])}, {BASE["id"]: BASE}, []
    for generation in range(1, args.generations + 1):
        index.add(e for e in map(example_of, pool) if e is not None)
        observed = [observation(a) for a in current_answers]
        children = {"static": evolve(current["text"], observed + pool, k=args.k, tools_first=True),
                    "dynamic": evolve(current["text"], observed, k=0, dynamic=True, tools_first=True)}
        tried = {}
        for kind, child in children.items():
            if child.text is None:
                log(f"generation {generation}, {kind}: {child.reason}")
                continue
            template = {"id": f"bfcl/evolved-g{generation}-{kind}", "text": child.text}
            tried[template["id"]] = await ask("free", evo_items, template)
            templates[template["id"]], scores[template["id"]] = template, posterior_mean(tried[template["id"]])
            pool += [o for o in map(observation, tried[template["id"]]) if not o.failed]
            log(f"generation {generation}, {kind}: {child.reason}; evolution slice "
                f"{rates(tried[template['id']])['valid']:.0%} valid\n{child.text}\n")
        order = {t: i for i, t in enumerate(scores)}  # evolution goes on from the newer of tied templates
        best = max(scores, key=lambda t: (scores[t], order[t]))
        lineage.append({"generation": generation, "scores": dict(scores), "best": best})
        if best == current["id"]:
            break
        current, current_answers = templates[best], tried[best]
    # Selection proper: the highest posterior mean, a tie kept by the older template (evolution went on from
    # the newer one, but a child no better on the evidence does not replace its parent).
    selected = templates[max(scores, key=lambda t: (scores[t], -list(scores).index(t)))]
    log(f"selection (posterior mean of validity on the evolution slice): {scores} -> {selected['id']}")
    index.add(e for e in map(example_of, pool) if e is not None)

    result: dict[str, Any] = {"n": len(test_items), "evolve_n": len(evo_items), "selected": selected["id"],
                              "selected_text": selected["text"], "lineage": lineage, "examples_indexed": len(index)}
    for d in decodings:
        base_answers = await ask(d, test_items, BASE)
        sel_answers = base_answers if selected is BASE else await ask(d, test_items, selected)
        variants = [("base", base_answers), ("selected", sel_answers)]
        if EXAMPLES_VAR not in selected["text"]:  # the selected rules with dynamic examples beside it
            dyn = {"id": selected["id"] + "+dynamic", "text": selected["text"] + "\n\n" + EXAMPLES_VAR}
            variants.append(("dynamic", await ask(d, test_items, dyn)))
        for name, answers in variants:
            for key, value in rates(answers).items():
                result[f"{d}_{name}_{key}"] = round(value, 4)
        log(f"test slice, {d}: " + ", ".join(f"{n} {result[f'{d}_{n}_valid']:.0%} valid "
                                             f"{result[f'{d}_{n}_exact']:.0%} exact" for n, _ in variants))
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
                             "dynamic": "selected + dynamic examples"}[name]
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
    parser.add_argument("--generations", type=int, default=2, help="rounds of evolve, then select")
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
