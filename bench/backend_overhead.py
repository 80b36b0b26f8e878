"""Tokens/s of `gguf:smollm2-135m` through our backend and the Router, against raw llama-cpp-python on the same model.

    .venv/bin/python bench/backend_overhead.py [--rounds 4] [--max-tokens 128] [--threads N]

The paths share one loaded `Llama` and run back to back on each prompt (order alternating between rounds), all
greedy; raw is `Llama.create_chat_completion`. On a shared machine tokens/s swings several-fold between calls,
so the figure that counts is the median of the per-prompt ratios (each taken between adjacent calls), by wall
time and by process CPU time. Target: backend / raw >= 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from app.backends.llamacpp import LlamaCppBackend
from app.bindings import parse_binding
from app.wire import ChatRequest

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "List ten uses for a paperclip and explain each.",
    "What makes a good team leader? Answer in detail.",
]
Run = Callable[[str], Awaitable[int]]  # runs one prompt, returns completion tokens


async def timed(run: Run, prompt: str) -> tuple[float, float]:
    """(tokens/s by wall time, tokens/s by process CPU time)."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = await run(prompt)
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def raw_path(llm, max_tokens: int) -> Run:
    async def run(prompt: str) -> int:
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
        return out["usage"]["completion_tokens"]
    return run


def chat_path(target, max_tokens: int) -> Run:
    async def run(prompt: str) -> int:
        req = ChatRequest(model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                          temperature=0)
        return (await target.complete(req)).usage.completion_tokens
    return run


def make_router(binding: str):
    from app.config import load_settings
    from app.routing.router import Router

    return Router(load_settings().bound_to(binding), store=None)


async def main(rounds: int, max_tokens: int, binding: str) -> None:
    backend = LlamaCppBackend(parse_binding(binding))
    llm = backend.model().llm
    paths = {"raw": raw_path(llm, max_tokens), "backend": chat_path(backend, max_tokens)}
    paths["router"] = chat_path(make_router(binding), max_tokens)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    await paths["raw"]("warm up")
    for r in range(rounds):
        for prompt in PROMPTS:
            for name in (list(paths) if r % 2 == 0 else list(reversed(paths))):
                results[name].append(await timed(paths[name], prompt))
    report(results, binding, rounds, max_tokens)


def report(results: dict[str, list[tuple[float, float]]], binding: str, rounds: int, max_tokens: int) -> None:
    print(f"{binding}: {rounds} rounds x {len(PROMPTS)} prompts, max_tokens={max_tokens}, greedy")
    raw = results["raw"]
    for name, values in results.items():
        wall = statistics.median(v[0] for v in values)
        ratio_wall = statistics.median(v[0] / r[0] for v, r in zip(values, raw))
        ratio_cpu = statistics.median(v[1] / r[1] for v, r in zip(values, raw))
        print(f"  {name:8s} median {wall:6.1f} tok/s   ratio to raw: wall {ratio_wall:5.3f}  cpu {ratio_cpu:5.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the backend's, every core up to 8)")
    args = parser.parse_args()
    binding = "gguf:smollm2-135m" + (f"?n_threads={args.threads}" if args.threads else "")
    asyncio.run(main(args.rounds, args.max_tokens, binding))
