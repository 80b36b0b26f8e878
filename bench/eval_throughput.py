"""Items/s of the eval runner against a bare loop over the backend on the same BFCL items, side by side.

    .venv/bin/python bench/eval_throughput.py [--items 20] [--rounds 3] [--binding gguf:smollm2-135m]
                                              [--decoding constrained] [--max-tokens 256]

On a shared machine a model's speed swings several-fold within minutes, so the two paths alternate in chunks of
a few items (which goes first flips each chunk) on one loaded model. Not item by item: the second of two calls
with the same prompt would reuse the first's KV cache and look faster. The paths:
- `bare`: `await backend.complete(request)`, nothing else;
- `runner`: the runner's own per-item path (`run_items` over the EvalRouter: Router, validation, scoring, the
  items.jsonl row), for the same request.
The runner's once-per-run work (settings, suite loading, summary.json, report.md, report.png) is timed after the
rounds and charged once per round. Printed: items/s of each path and runner / bare, from summed wall and CPU
times, and the median of per-chunk ratios. Target: >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.backends.base import BACKENDS  # noqa: E402
from app.bindings import parse_binding  # noqa: E402
from app.config import load_settings  # noqa: E402
from training.evaluate import (EvalOptions, EvalRouter, ModelRun, append_rows, build_request,  # noqa: E402
                               eval_settings, item_asker, run_items)
from training.report import write_report  # noqa: E402
from training.suites import load_suite  # noqa: E402

SUITE = "bfcl:simple_python"


class Paths:
    """The two ways to answer one item, sharing the process's one loaded model."""

    def __init__(self, options: EvalOptions, out: Path):
        self.options, self.out = options, out
        self.backend = BACKENDS.get(parse_binding(options.models[0]))
        router = EvalRouter(eval_settings(load_settings(), options.models[0]), options.decoding)
        self.ask = item_asker(router, options, None)
        self.rows: list[dict] = []

    async def bare(self, item) -> None:
        await self.backend.complete(build_request(item, self.options.decoding, self.options.max_tokens))

    async def runner(self, item) -> None:
        run = ModelRun(self.options.models[0])
        await run_items(run, [item], self.ask, 1)
        append_rows(self.out / "items.jsonl", run.rows)
        self.rows += run.rows

    def once_per_run(self) -> None:
        """What run_eval does besides answering items."""
        load_settings()
        suite = load_suite(SUITE, limit=self.options.limit)
        run = ModelRun(self.options.models[0], rows=self.rows[: self.options.limit])
        write_report(self.out, suite, [run], self.options)


async def timed(call) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await call
    return time.perf_counter() - wall, time.process_time() - cpu


async def run_chunk(path, chunk: list) -> None:
    for item in chunk:
        await path(item)


async def measure(paths: Paths, items: list, rounds: int, chunk: int) -> dict[str, list[tuple[float, float]]]:
    """Per path, (wall, CPU) seconds of each chunk."""
    times: dict[str, list[tuple[float, float]]] = {"bare": [], "runner": []}
    for item in items:  # load the model, warm up, compile every grammar once
        await paths.bare(item)
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    for r in range(rounds):
        for c, part in enumerate(chunks):
            for name in (["bare", "runner"] if (r * len(chunks) + c) % 2 == 0 else ["runner", "bare"]):
                times[name].append(await timed(run_chunk(getattr(paths, name), part)))
        done = len(chunks)
        print(f"round {r + 1}: bare {len(items) / sum(t[0] for t in times['bare'][-done:]):.2f} items/s, "
              f"runner {len(items) / sum(t[0] for t in times['runner'][-done:]):.2f} items/s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--binding", default="gguf:smollm2-135m")
    parser.add_argument("--decoding", default="constrained", choices=["constrained", "free"])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=5)
    args = parser.parse_args()
    items = load_suite(SUITE, limit=args.items).items
    with tempfile.TemporaryDirectory() as out:
        options = EvalOptions(SUITE, (args.binding,), limit=args.items, decoding=args.decoding,
                              max_tokens=args.max_tokens, out=out)
        paths = Paths(options, Path(out))
        times = asyncio.run(measure(paths, items, args.rounds, args.chunk))
        wall, cpu = time.perf_counter(), time.process_time()
        paths.once_per_run()
        fixed = (time.perf_counter() - wall, time.process_time() - cpu)
    report(times, fixed, args)


def report(times: dict[str, list[tuple[float, float]]], fixed: tuple[float, float], args) -> None:
    n = args.items * args.rounds
    print(f"\n{SUITE}, {args.items} items x {args.rounds} rounds in chunks of {args.chunk}, {args.binding}, "
          f"{args.decoding}, max_tokens {args.max_tokens}; once-per-run work {fixed[0]:.2f} s wall")
    for i, kind in enumerate(("wall", "CPU")):
        bare = sum(t[i] for t in times["bare"])
        runner = sum(t[i] for t in times["runner"]) + fixed[i] * args.rounds
        median = statistics.median(b[i] / r[i] for b, r in zip(times["bare"], times["runner"]))
        print(f"by {kind:4s} time: bare {n / bare:.3f} items/s, runner {n / runner:.3f} items/s; runner / bare "
              f"{bare / runner:.3f} (sums, once-per-run work included), {median:.3f} (median of per-chunk ratios); "
              "target >= 0.9")


if __name__ == "__main__":
    main()
