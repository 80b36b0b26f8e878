"""Tokens/s of grammar-constrained vs free decoding on a long JSON answer, SmolLM2-135M, greedy.

    .venv/bin/python bench/constrained_decoding.py [--rounds 3] [--max-tokens 300]

Side by side on the same prompt and the same loaded model, each constrained path against the free path that
drives llama.cpp the same way (run back to back, order alternating, median of per-round ratios):

  ours: llguidance mask        our token loop, mask written into the logits, every token sampled
  ours: llguidance + ff        the same, tokens the grammar forces evaluated in one batch unsampled (the default)
        vs ours: free          our token loop, no grammar
  lcp: llguidance processor    llama-cpp-python's `Llama.generate(logits_processor=...)` applying the same mask
                               (what `create_completion(logits_processor=...)` runs)
  lcp: llama.cpp GBNF          `Llama.generate(grammar=LlamaGrammar.from_json_schema(...))`
        vs lcp: free           `Llama.generate` with no grammar
  router: constrained          `Router.complete` with the schema as response_format (what every caller gets)
        vs router: free        the same request with `decoding="free"` (it stops at EOS: tokens/s, not time)

Target: constrained / free >= 0.9. The free paths ignore end-of-sequence and run to --max-tokens (about the
length of the constrained JSON), so every path decodes about as many tokens at about the same context length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

from app.backends import chat_format
from app.backends.grammar import TokenMask, compiled_matcher, json_rule, tame
from app.backends.llamacpp import LlamaCppBackend, LocalModel, Sampling, generate
from app.bindings import parse_binding
from app.wire import Message

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "role": {"enum": ["engineer", "doctor", "artist", "teacher", "farmer"]},
    "city": {"type": "string"}, "skills": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3}},
    "required": ["name", "age", "role", "city", "skills"]}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON, "minItems": 6, "maxItems": 6}},
          "required": ["people"]}
QUESTION = "List six people with their name, age, job, city and skills, as JSON."

Path = Callable[[], tuple[int, float]]  # runs once: (completion tokens, seconds)


def ours(model: LocalModel, prompt: str, max_tokens: int, constrained: bool, fast_forward: bool = True) -> Path:
    free_model = dataclasses.replace(model, eog=frozenset())  # same Llama and lock; never stops on EOS

    def run() -> tuple[int, float]:
        with model.lock:
            mask = _mask(model) if constrained else None
            started = time.perf_counter()
            gen = generate(model if constrained else free_model, prompt, Sampling(max_tokens=max_tokens), mask,
                           fast_forward=fast_forward)
            return gen.completion_tokens, time.perf_counter() - started
    return run


def _mask(model: LocalModel) -> TokenMask:
    tokenizer = model.tokenizer()
    return TokenMask(compiled_matcher(tokenizer, f"start: {json_rule(tame(SCHEMA))}"), tokenizer.vocab_size)


def lcp_generate(model: LocalModel, prompt: str, max_tokens: int, how: str) -> Path:
    """llama-cpp-python's own token generator, free or under llguidance / GBNF."""
    import llama_cpp

    llm = model.llm
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    gbnf = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False) if how == "gbnf" else None

    def run() -> tuple[int, float]:
        processors = llama_cpp.LogitsProcessorList([_processor(_mask(model), len(tokens))]) if how == "llg" else None
        started, n = time.perf_counter(), 0
        for token in llm.generate(tokens, temp=0, grammar=gbnf, logits_processor=processors):
            if how != "free" and token in model.eog:
                break
            n += 1
            if n >= max_tokens:
                break
        return n, time.perf_counter() - started
    return run


def _processor(mask: TokenMask, n_prompt: int):
    seen = n_prompt

    def process(input_ids, scores):
        nonlocal seen
        for token in input_ids[seen:]:  # the tokens sampled since the last call
            mask.consume(int(token))
        seen = len(input_ids)
        mask.apply(scores)
        return scores
    return process


def through_router(max_tokens: int, decoding: str) -> Path:
    import asyncio

    from app.config import load_settings
    from app.routing.router import Router
    from app.wire import ChatRequest

    router = Router(load_settings().bound_to("gguf:smollm2-135m"), store=None)
    req = ChatRequest(model="bench", messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens,
                      temperature=0, decoding=decoding,
                      response_format={"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}})

    def run() -> tuple[int, float]:
        started = time.perf_counter()
        resp = asyncio.run(router.complete(req))
        return resp.usage.completion_tokens, time.perf_counter() - started
    return run


def main(rounds: int, max_tokens: int) -> None:
    model = LlamaCppBackend(parse_binding("gguf:smollm2-135m")).model()
    prompt = chat_format.render_prompt([Message(role="user", content=QUESTION)], [], model.family)
    paths: dict[str, Path] = {
        "ours: free": ours(model, prompt, max_tokens, constrained=False),
        "ours: llguidance mask": ours(model, prompt, max_tokens, constrained=True, fast_forward=False),
        "ours: llguidance + ff": ours(model, prompt, max_tokens, constrained=True),
        "lcp: free": lcp_generate(model, prompt, max_tokens, "free"),
        "lcp: llguidance processor": lcp_generate(model, prompt, max_tokens, "llg"),
        "lcp: llama.cpp GBNF": lcp_generate(model, prompt, max_tokens, "gbnf"),
        "router: free": through_router(max_tokens, "free"),
        "router: constrained": through_router(max_tokens, "constrained"),
    }
    for run in paths.values():  # warm up: compile grammars, fill caches
        run()
    rates: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for name in (list(paths) if r % 2 == 0 else list(reversed(paths))):
            n, seconds = paths[name]()
            rates[name].append(n / seconds)
            tokens[name] = n
    report(rates, tokens, rounds)


def report(rates: dict[str, list[float]], tokens: dict[str, int], rounds: int) -> None:
    print(f"SmolLM2-135M, {rounds} rounds, greedy; ratio = median over rounds of constrained / free of that round")
    for name, values in rates.items():
        base = rates[name.split(":")[0] + ": free"]
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"  {name:26s} {statistics.median(values):6.1f} tok/s  {tokens[name]:4d} tokens  ratio {ratio:5.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=250)
    args = parser.parse_args()
    main(args.rounds, args.max_tokens)
