"""Our BFCL verdicts against BFCL's own ast_checker on real SmolLM2 outputs (simple_python, both decodings).

The runner's `exact` (validation, then bfcl_match on the valid calls) must equal what BFCL's checker says about
the calls decoded from the same raw output, schema checks skipped: where they disagree, ours is wrong.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support.requires import require

require("llama_cpp")
require("bfcl_eval")

from app.validation import parse_calls  # noqa: E402
from tests.support.bfcl_judge import bfcl_ast_check  # noqa: E402
from training.bfcl import load_category  # noqa: E402
from training.evaluate import EvalOptions, run_eval  # noqa: E402

ITEMS = 50
# Constrained calls of simple_python take 20-80 tokens; free text only needs enough room to show its form.
MAX_TOKENS = {"constrained": 128, "free": 48}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


def test_our_exact_equals_bfcls_ast_checker_on_real_outputs(tmp_path):
    items = {item.id: item for item in load_category("simple_python", limit=ITEMS)}
    rows, started = [], time.perf_counter()
    for decoding, max_tokens in MAX_TOKENS.items():
        out = tmp_path / decoding
        run_eval(EvalOptions("bfcl:simple_python", ("gguf:smollm2-135m",), limit=ITEMS, decoding=decoding,
                             max_tokens=max_tokens, out=out))
        rows += [(decoding, row) for row in _rows(out)]
    elapsed = time.perf_counter() - started

    disagreements = []
    for decoding, row in rows:
        item = items[row["id"]]
        decoded = parse_calls(content=row["output"], tool_calls=None).calls
        theirs = bfcl_ast_check(item.functions, decoded, item.possible_answer, "simple_python")
        if theirs != row["exact"]:
            disagreements.append((decoding, row["id"], row["output"], row["exact"], theirs))

    assert len(rows) == 2 * ITEMS
    exact = [row["exact"] for decoding, row in rows if decoding == "constrained"]
    assert sum(exact) >= 15, "too few exact answers for the check to exercise both verdicts"
    assert len(disagreements) <= len(rows) // 100, disagreements
    print(f"\n{len(rows)} outputs, {sum(exact)} exact (constrained), {len(disagreements)} disagreements, "
          f"{elapsed:.0f} s")
