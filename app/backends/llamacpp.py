"""The `gguf:` backend: a local GGUF model through llama-cpp-python, decoding under an llguidance grammar.

One `llama_cpp.Llama` is loaded per (file, lora, n_ctx) per process, lazily, and shared by every binding that
names it; calls run in a worker thread and are serialised per model by a `threading.Lock` (callers may live on
different event loops). Generation is our own token loop over `Llama.eval` and a llama.cpp sampler chain rather
than `create_completion`: it lets the grammar's token mask be written straight into llama.cpp's logits buffer,
lets tokens the grammar forces (JSON keys, closing tags) be evaluated in one batch without sampling, and reuses
the KV cache for the prompt prefix the previous call shared (the system prompt and tools, on every agent call).
Every generated token is scored as it is sampled (`_score`), which gives each answer its confidence and, when a
request asks, OpenAI `logprobs`.
Whatever llama.cpp or llguidance raise while answering is mapped into `app.errors` in `_engine_errors`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.backends import chat_format
from app.backends.chat_format import Family
from app.backends.grammar import TEXT_TAGS, TokenMask, ToolTags, compiled_matcher, request_lark
from app.bindings import Binding, GGUFOptions
from app.errors import BackendError, MissingDependency, SlmSwapError, UsageError
from app.hermes import TOOL_CLOSE, TOOL_OPEN
from app.local_models import resolve_model
from app.toolplan import ToolPlan, request_plan
from app.wire import (AssistantMessage, ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceLogprobs, ChunkChoice,
                      DeltaMessage, TokenLogprob, TopLogprob, Usage)

LLAMA_INSTALL = ('make install   (or build it without native flags and without pip\'s cache: CMAKE_ARGS="-DGGML_NATIVE=OFF" '
                 'pip install --no-binary llama-cpp-python --no-cache-dir llama-cpp-python==0.3.36)')
DEFAULT_MAX_TOKENS = 512
# Small local models answer best greedy; an explicit temperature is honoured.
DEFAULT_TEMPERATURE = 0.0
# llama.cpp's own defaults for the sampled (temperature > 0) path: they keep a 135M model off the long tail.
TOP_K, MIN_P = 40, 0.05
PENALTY_WINDOW = 256
# An embedding row this close to a padding row's was never trained (Qwen2.5-Coder-0.5B's <tool_call>: see
# `unlearned_tags`; its trained <|im_start|> is at 0.92 of that row).
UNLEARNED_COSINE = 0.99


def default_threads() -> int:
    """Every core up to 8. llama-cpp-python's own default (half the cores) leaves a small machine half idle:
    on a 2-core CI box it decodes SmolLM2 at ~78 tok/s on one thread."""
    return max(1, min(os.cpu_count() or 1, 8))


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependency(f"gguf: bindings need llama-cpp-python; run: {LLAMA_INSTALL}") from None
    return llama_cpp


# ---- loaded models -------------------------------------------------------------------------------------

@dataclass
class LocalModel:
    """A loaded GGUF model with what decoding needs from it; use only while holding `lock`."""

    llm: Any
    family: Family
    eog: frozenset[int]  # end-of-generation tokens (<|im_end|>, <end_of_turn>, <eos>, ...)
    tags: ToolTags = TEXT_TAGS  # how this vocabulary spells <tool_call> and </tool_call>
    lock: threading.Lock = field(default_factory=threading.Lock)
    _pieces: dict[int, bytes] = field(default_factory=dict)
    _tokenizer: Any = None
    prompt_format: chat_format.PromptFormat | None = None  # None: the hand-written `family`
    # Tags whose one token the model never learned (`unlearned_tags`): the prompt spells them as text it can read.
    spelled_tags: tuple[str, ...] = ()

    @property
    def vocab(self) -> Any:
        return import_llama_cpp().llama_model_get_vocab(self.llm.model)

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to the text (control tokens add none, except the tool-call tags: the output
        parser must see `<tool_call>` whether the model spells it as text or as one special token)."""
        piece = self._pieces.get(token)
        if piece is None:
            special = token in (self.tags.open, self.tags.close)
            piece = self._pieces[token] = self._to_piece(token, 64, special)
        return piece

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt's tokens, special tokens parsed, except `spelled_tags`, which are written as ordinary text
        (llama.cpp matches a user-defined token even with special=False, so the tag is cut before its name)."""
        llm = self.llm
        if not self.spelled_tags:
            return llm.tokenize(prompt.encode(), add_bos=True, special=True)
        tokens = llm.tokenize(b"", add_bos=True, special=True)  # the BOS, where the model adds one
        pattern = "(" + "|".join(map(re.escape, self.spelled_tags)) + ")"
        for i, part in enumerate(re.split(pattern, prompt)):
            if i % 2:  # a tag: "<" + "tool_call>", "</" + "tool_call>", the tokens the text has without the tag
                cut = re.search(r"\w", part).start()  # type: ignore[union-attr]
                tokens += [t for half in (part[:cut], part[cut:])
                           for t in llm.tokenize(half.encode(), add_bos=False, special=False)]
            elif part:
                tokens += llm.tokenize(part.encode(), add_bos=False, special=True)
        return tokens

    def _to_piece(self, token: int, size: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(size)
        n = import_llama_cpp().llama_token_to_piece(self.vocab, token, buf, size, 0, special)
        return self._to_piece(token, -n, special) if n < 0 else buf.raw[:n]  # n < 0: the size it needs

    def tokenizer(self) -> Any:
        """The llguidance tokenizer for this vocabulary, built on first constrained call (~0.2 s for SmolLM2)."""
        if self._tokenizer is None:
            from app.backends.grammar import import_llguidance

            import_llguidance()
            from llguidance.llamacpp import lltokenizer_from_vocab

            self._tokenizer = lltokenizer_from_vocab(self.vocab, eos_token=sorted(self.eog))
        return self._tokenizer


_MODELS: dict[tuple[str, str | None, int], LocalModel] = {}
_MODELS_LOCK = threading.Lock()


def load_model(path: Path, options: GGUFOptions) -> LocalModel:
    """The process-wide LocalModel for this file, LoRA adapter and context size, loading it on first use.

    Bindings that differ only in n_threads, n_gpu_layers or seed share the model the first of them loaded.
    """
    key = (str(path.resolve()), options.lora, options.n_ctx)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = _MODELS[key] = _load(path, options)
        return model


def _load(path: Path, options: GGUFOptions) -> LocalModel:
    llama_cpp = import_llama_cpp()
    if options.lora and not Path(options.lora).expanduser().is_file():
        raise MissingDependency(f"LoRA adapter not found: {options.lora}; give the path of a GGUF LoRA file")
    try:
        llm = llama_cpp.Llama(
            str(path), n_ctx=options.n_ctx, n_threads=options.n_threads or default_threads(), n_gpu_layers=options.n_gpu_layers,
            seed=options.seed, lora_path=str(Path(options.lora).expanduser()) if options.lora else None,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise BackendError(
            f"llama.cpp could not load {path}: {exc}; is it a GGUF file (and the LoRA one made for it)?"
        ) from None
    fmt = chat_format.prompt_format_of(llm.metadata)
    tags = tool_tags(llm)
    return LocalModel(llm=llm, family=fmt.family, eog=_eog_tokens(llm), tags=tags, prompt_format=fmt,
                      spelled_tags=unlearned_tags(path, tags))


def _eog_tokens(llm: Any) -> frozenset[int]:
    llama_cpp = import_llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return frozenset(t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))


def tool_tags(llm: Any) -> ToolTags:
    """The model's spelling of the call tags: a tag its vocabulary turns into one control or user-defined token
    (Qwen2.5's 151657, Hermes-3's) is that token in the grammar; any other is text."""
    return ToolTags(open=_tag_token(llm, TOOL_OPEN), close=_tag_token(llm, TOOL_CLOSE))


def _tag_token(llm: Any, tag: str) -> int | None:
    llama_cpp = import_llama_cpp()
    tokens = llm.tokenize(tag.encode(), add_bos=False, special=True)
    if len(tokens) != 1:
        return None
    attr = llama_cpp.llama_token_get_attr(llama_cpp.llama_model_get_vocab(llm.model), tokens[0])
    return tokens[0] if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED) else None


def unlearned_tags(path: Path, tags: ToolTags) -> tuple[str, ...]:
    """The tag strings whose single token the model never learned: its input-embedding row is the same as
    (cosine >= UNLEARNED_COSINE after dequantising: quantisation leaves a few bytes apart) the table's
    last row, a padding row past the tokenizer's vocabulary that training never touched.

    Qwen2.5-Coder-0.5B-Instruct's <tool_call> (151657) and </tool_call> (151658) are such rows (cosine 1.00
    to the last row; its trained <|im_start|> is at 0.92). Fed as
    that token, the tool instructions and the worked examples it was shown read as `<?>\\n{json}\\n<?>`; it
    answered with `<|im_start|>` (p 0.65; 151657 had log-probability -19.6), a control token that renders as
    nothing, so its call came out bare. Spelled as text, it writes the tags. SmolLM2 has no such row.
    """
    special = [(tag, t) for tag, t in ((TOOL_OPEN, tags.open), (TOOL_CLOSE, tags.close)) if t is not None]
    if not special:
        return ()
    from gguf import GGUFReader

    from gguf import dequantize

    table = next((t for t in GGUFReader(path).tensors if t.name == "token_embd.weight"), None)
    if table is None or len(table.data) == 0:
        return ()
    last = len(table.data) - 1
    ids = [t for _, t in special if t < last]
    rows = dequantize(table.data[[*ids, last]], table.tensor_type).astype(np.float64)
    pad = rows[-1]
    same = {t for t, row in zip(ids, rows) if row @ pad >= UNLEARNED_COSINE * np.linalg.norm(row) * np.linalg.norm(pad)}
    return tuple(tag for tag, t in special if t in same)


# ---- one generation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_logprobs: int = 0  # how many of the likeliest tokens to keep per step (OpenAI's top_logprobs)

    @classmethod
    def from_request(cls, req: ChatRequest, default_seed: int = 0) -> Sampling:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return cls(
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=default_seed if req.seed is None else req.seed,
            max_tokens=req.token_limit(DEFAULT_MAX_TOKENS),
            stop=tuple(s for s in stop if s),
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
        )


@dataclass(frozen=True)
class TokenProb:
    """One generated token: its bytes, its log-probability (0.0 where the grammar forced it), the likeliest
    tokens of that step as (bytes, logprob) when asked, and the length of the text once it was added."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()
    end: int = 0  # characters of text up to and including this token: which stream chunk carries it


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    tokens: list[TokenProb] = field(default_factory=list)  # one per completion token (the end token is not one)

    @property
    def confidence(self) -> float | None:
        """The mean log-probability of the generated tokens, forced ones counting 0.0; None when there are none."""
        return sum(t.logprob for t in self.tokens) / len(self.tokens) if self.tokens else None


OnText = Callable[[str, list[TokenProb]], bool]  # gets the text and tokens so far; returns False to stop generating


def generate(model: LocalModel, prompt: str, sampling: Sampling, mask: TokenMask | None = None,
             on_text: OnText | None = None, fast_forward: bool = True) -> Generation:
    """Decode a reply to `prompt` token by token; the caller holds `model.lock`.

    `fast_forward=False` samples every token even where the grammar forces it (for benchmarks).
    """
    llm = model.llm
    tokens = model.tokenize(prompt)
    budget = _budget(llm, len(tokens), sampling.max_tokens)
    _prefill(llm, tokens)
    sampler = _sampler(sampling, llm.n_vocab())
    decoder = _Decoder(model, sampler, mask, on_text, fast_forward, sampling.temperature, sampling.top_logprobs)
    try:
        text, finish = decoder.run(budget, sampling.stop)
    finally:
        sampler.close()
    return Generation(text, len(tokens), len(decoder.tokens), finish, decoder.tokens)


def _budget(llm: Any, n_prompt: int, max_tokens: int) -> int:
    # llama.cpp may raise a tiny n_ctx to its minimum (256) while llama-cpp-python sized its buffers to the request.
    n_ctx = min(llm.n_ctx(), len(llm.input_ids))
    if n_prompt >= n_ctx:
        raise UsageError(
            f"the prompt is {n_prompt} tokens, more than the model's context of {n_ctx}; shorten it or "
            "raise n_ctx in the binding (e.g. gguf:smollm2-135m?n_ctx=8192)"
        )
    return min(max_tokens, n_ctx - n_prompt)


def _prefill(llm: Any, tokens: list[int]) -> None:
    """Evaluate the prompt, keeping the KV cache for the prefix the previous call shared with it."""
    previous = llm._input_ids
    n = min(len(previous), len(tokens))
    differ = np.flatnonzero(previous[:n] != np.asarray(tokens[:n], dtype=previous.dtype))
    keep = min(int(differ[0]) if differ.size else n, len(tokens) - 1)  # re-evaluate >= 1 token for fresh logits
    # Sliding-window caches (Gemma 3) may refuse a partial removal; then start from scratch.
    if keep > 0 and not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
        keep = 0
    llm.n_tokens = keep
    llm.eval(tokens[keep:])


def _sampler(sampling: Sampling, n_vocab: int) -> Any:
    from llama_cpp._internals import LlamaSampler

    sampler = LlamaSampler()
    if sampling.frequency_penalty or sampling.presence_penalty:
        # OpenAI's penalties over the generated tokens (llama.cpp looks back PENALTY_WINDOW tokens).
        sampler.add_penalties(n_vocab, PENALTY_WINDOW, 1.0, sampling.frequency_penalty, sampling.presence_penalty)
    if sampling.temperature <= 0:
        sampler.add_greedy()
        return sampler
    sampler.add_top_k(TOP_K)
    sampler.add_top_p(sampling.top_p, 1)
    sampler.add_min_p(MIN_P, 1)
    sampler.add_temp(sampling.temperature)
    sampler.add_dist(sampling.seed)
    return sampler


@dataclass
class _Decoder:
    model: LocalModel
    sampler: Any
    mask: TokenMask | None
    on_text: OnText | None
    fast_forward: bool
    temperature: float
    top_n: int  # top_logprobs to keep per token (0: none)
    tokens: list[TokenProb] = field(default_factory=list)

    def run(self, budget: int, stop: tuple[str, ...]) -> tuple[str, str]:
        """(text, finish reason) for up to `budget` tokens; `tokens` holds what was generated."""
        llm, out = self.model.llm, _TextOut(stop)
        while len(self.tokens) < budget:
            token, scored = self._sample()
            if token in self.model.eog:
                return out.finish(), "stop"
            new = self._advance(token, budget - len(self.tokens) - 1)
            pieces = [self.model.piece(t) for t in new]
            cut = out.add(b"".join(pieces))
            end = len(out.text)
            self.tokens += [replace(scored, piece=pieces[0], end=end), *(self._forced(p, end) for p in pieces[1:])]
            if cut or self._ends(out.text):
                return out.finish(), "stop"
            llm.eval(new)
        return out.finish(), "length"

    def _sample(self) -> tuple[int, TokenProb]:
        logits = _last_logits(self.model.llm)
        if self.mask is not None:
            self.mask.apply(logits)
        # The sampler works on its own copy of the logits, so the masked row is still there to score.
        token = self.sampler.sample(self.model.llm._ctx, -1)
        return token, _score(logits, token, self.temperature, self.top_n, self.model.piece)

    def _forced(self, piece: bytes, end: int) -> TokenProb:
        """A token the grammar forced: the only one allowed, so certain."""
        return TokenProb(piece, 0.0, ((piece, 0.0),) if self.top_n else (), end)

    def _advance(self, token: int, room: int) -> list[int]:
        """The sampled token plus, when fast-forwarding, the tokens the grammar then forces (at most `room`)."""
        if self.mask is None:
            return [token]
        self.mask.consume(token)
        forced = self.mask.forced()[:room] if self.fast_forward and not self.mask.done else []
        for t in forced:
            self.mask.consume(t)
        return [token, *forced]

    def _ends(self, text: str) -> bool:
        if self.mask is not None and self.mask.done:
            return True
        return self.on_text is not None and not self.on_text(text, self.tokens)


def _last_logits(llm: Any) -> Any:
    ptr = import_llama_cpp().llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def _score(logits: Any, token: int, temperature: float, top_n: int, piece: Callable[[int], bytes]) -> TokenProb:
    """The sampled token's log-probability under softmax(masked logits / T), T = 1 when greedy, and the top_n
    likeliest tokens of that distribution.

    Forbidden tokens are -inf, so this is renormalised over what the grammar allows. It is the distribution before
    llama.cpp's top-k / top-p / min-p cut and penalties (OpenAI reports the untruncated one too). One log-sum-exp
    over the row per token: ~0.1 ms for SmolLM2's 49k logits, against ~13 ms to decode the token.
    """
    row = logits / temperature if temperature > 0 else logits
    peak = row.max()
    norm = peak + np.log(np.exp(row - peak).sum(dtype=np.float64))
    logprob = min(0.0, float(row[token] - norm))  # <= 0 already; min() keeps float rounding from saying otherwise
    if not top_n:
        return TokenProb(b"", logprob)
    best = np.argpartition(row, -top_n)[-top_n:]
    best = best[np.argsort(-row[best], kind="stable")]
    top = tuple((piece(int(t)), min(0.0, float(row[t] - norm))) for t in best if np.isfinite(row[t]))
    return TokenProb(b"", logprob, top)


class _TextOut:
    """Decoded text so far, cut at the first stop string."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.text = ""
        self.cut = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, data: bytes) -> bool:
        """Append bytes; True when a stop string appeared (the text is cut before it)."""
        start = len(self.text)
        self.text += self._decoder.decode(data)
        for s in self.stop:
            at = self.text.find(s, max(0, start - len(s) + 1))
            if at >= 0:
                self.text, self.cut = self.text[:at], True
        return self.cut

    def finish(self) -> str:
        if not self.cut:
            self.text += self._decoder.decode(b"", final=True)
        return self.text


# ---- the backend ---------------------------------------------------------------------------------------

class LlamaCppBackend:
    """`gguf:<alias or path>`: answers chat requests with a local GGUF model.

    >>> from app.bindings import parse_binding
    >>> backend = LlamaCppBackend(parse_binding("gguf:smollm2-135m"))   # loads nothing yet
    """

    def __init__(self, binding: Binding):
        self.binding = binding
        self.options: GGUFOptions = binding.options  # type: ignore[assignment]
        self._model: LocalModel | None = None

    def model(self) -> LocalModel:
        if self._model is None:
            self._model = load_model(resolve_model(self.binding.target), self.options)
        return self._model

    async def complete(self, req: ChatRequest) -> ChatResponse:
        gen, plan = await asyncio.to_thread(self.run, req)
        return to_response(gen, plan, self.binding.name, bool(req.logprobs))

    def run(self, req: ChatRequest, on_text: OnText | None = None) -> tuple[Generation, ToolPlan]:
        """Generate synchronously (in the caller's thread): the text and the tool plan it was decoded under."""
        plan = request_plan(req)
        model = self.model()
        lark = request_lark(req, model.tags)
        prompt = (model.prompt_format or chat_format.hand_format(model.family)).render(req.messages, plan.functions)
        sampling = Sampling.from_request(req, self.options.seed)
        with model.lock, _engine_errors(model, self.binding.name):
            mask = _mask(model, lark) if lark else None
            return generate(model, prompt, sampling, mask, on_text), plan

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        streamer = _Streamer(self, req)
        async for chunk in streamer.chunks():
            yield chunk


# llama_decode's return codes (llama.h): 1 means no room left in the KV cache, 2 an abort; < 0 are fatal.
_DECODE_FULL = "llama_decode returned 1"


@contextlib.contextmanager
def _engine_errors(model: LocalModel, binding: str) -> Iterator[None]:
    """Map what llama.cpp and llguidance raise while answering into our tree, so no raw exception escapes.

    The KV cache may be half-written after a failed decode, so the next call re-evaluates its prompt from scratch.
    """
    try:
        yield
    except SlmSwapError:
        raise  # ours already (the prompt is too long, the grammar rejected a token): says what to do
    except (RuntimeError, ValueError, OSError) as exc:
        model.llm.n_tokens = 0
        raise BackendError(_engine_failure(exc, model.llm.n_ctx(), binding)) from None


def _engine_failure(exc: Exception, n_ctx: int, binding: str) -> str:
    # Only the first line, and never past "text=": llama-cpp-python's tokenize errors quote the prompt, which may
    # hold secrets that must not reach logs or captures.
    detail = (str(exc).splitlines() or [""])[0].split(" text=")[0][:200] or type(exc).__name__
    if detail.startswith(_DECODE_FULL):
        return (f"{binding}: llama.cpp ran out of context (n_ctx={n_ctx}) while decoding ({detail}); shorten the "
                f"prompt, lower max_tokens or raise n_ctx in the binding (e.g. {binding}?n_ctx=8192)")
    return (f"{binding}: the local model failed while answering ({type(exc).__name__}: {detail}); the request was "
            "not answered, retry it, and if it fails again try another binding or report the error")


def _mask(model: LocalModel, lark: str) -> TokenMask:
    tokenizer = model.tokenizer()
    return TokenMask(compiled_matcher(tokenizer, lark), tokenizer.vocab_size)


def to_response(gen: Generation, plan: ToolPlan, model_name: str, logprobs: bool = False) -> ChatResponse:
    """The OpenAI response for a generation: tool calls parsed out when the request offered tools, the confidence
    always, and `logprobs` for every generated token (tool-call tokens included) when the request asked."""
    content, calls = chat_format.parse_tool_calls(gen.text) if plan.mode != "none" else (gen.text, [])
    finish = "tool_calls" if calls and gen.finish_reason != "length" else gen.finish_reason
    message = AssistantMessage(content=content, tool_calls=calls or None)
    choice = Choice(message=message, logprobs=wire_logprobs(gen.tokens) if logprobs else None, finish_reason=finish,
                    confidence=gen.confidence)
    return ChatResponse(model=model_name, choices=[choice], usage=_usage(gen))


def wire_logprobs(tokens: list[TokenProb]) -> ChoiceLogprobs:
    """Tokens in OpenAI's `logprobs` shape; `token` is the text of the bytes (a split character shows as U+FFFD)."""
    return ChoiceLogprobs(content=[
        TokenLogprob(**_entry(t.piece, t.logprob), top_logprobs=[TopLogprob(**_entry(p, lp)) for p, lp in t.top])
        for t in tokens])


def _entry(piece: bytes, logprob: float) -> dict[str, Any]:
    return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}


def _usage(gen: Generation) -> Usage:
    total = gen.prompt_tokens + gen.completion_tokens
    return Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens, total_tokens=total)


# ---- streaming -----------------------------------------------------------------------------------------

class _Streamer:
    """Runs one generation in a worker thread and turns its growing text into OpenAI chunks.

    Text is streamed as it is decoded, except a tail that could still become a stop string or a `<tool_call>`
    marker; once a marker appears the rest is collected and sent as tool-call deltas at the end. When the request
    asks for logprobs, a chunk carries those of the tokens whose text it completes; the first final chunk carries
    the rest (held-back text, tool calls), so the chunks' logprobs add up to what `complete` reports.
    """

    def __init__(self, backend: LlamaCppBackend, req: ChatRequest):
        self.backend, self.req = backend, req
        self.plan = request_plan(req)
        self.markers = [*Sampling.from_request(req).stop, *([TOOL_OPEN] if self.plan.mode != "none" else [])]
        self.cancelled = threading.Event()
        self.sent = 0  # characters of text already streamed
        self.collecting = False  # a tool-call marker was seen: hold the rest back
        self.id = ChatResponse(choices=[]).id
        self.queued = 0  # tokens handed to the consumer (touched by the worker thread only)
        self.pending: list[TokenProb] = []  # tokens whose chunk has not gone out yet

    async def chunks(self) -> AsyncIterator[ChatChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, list[TokenProb]] | None] = asyncio.Queue()

        def on_text(text: str, tokens: list[TokenProb]) -> bool:
            new, self.queued = tokens[self.queued:], len(tokens)  # a copy: the worker goes on appending
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (text, new))
            except RuntimeError:  # the consumer's loop is gone
                return False
            return not self.cancelled.is_set()

        task = asyncio.ensure_future(asyncio.to_thread(self.backend.run, self.req, on_text))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            yield self._chunk(DeltaMessage(role="assistant", content=""))
            while (item := await queue.get()) is not None:
                text, tokens = item
                self.pending += tokens
                if delta := self._safe_delta(text):
                    yield self._chunk(DeltaMessage(content=delta), logprobs=self._take(self.sent))
            gen, plan = task.result()
            for chunk in self._final(to_response(gen, plan, self.backend.binding.name)):
                yield chunk
        finally:
            self.cancelled.set()  # a consumer that went away stops the worker at its next token

    def _safe_delta(self, text: str) -> str:
        if self.collecting:
            return ""
        if TOOL_OPEN in self.markers and (at := text.find(TOOL_OPEN, max(0, self.sent - len(TOOL_OPEN)))) >= 0:
            self.collecting = True
            end = at
        else:
            end = len(text) - chat_format.held_back(text, self.markers)
        delta, self.sent = text[self.sent:end], max(self.sent, end)
        return delta

    def _final(self, response: ChatResponse) -> list[ChatChunk]:
        choice = response.choices[0]
        chunks = []
        if choice.message.tool_calls:
            chunks += [self._chunk(DeltaMessage(tool_calls=_call_deltas(i, c))) for i, c in
                       enumerate(choice.message.tool_calls)]
        elif rest := (choice.message.content or "")[self.sent:]:
            chunks.append(self._chunk(DeltaMessage(content=rest)))
        last = self._chunk(DeltaMessage(), finish_reason=choice.finish_reason)
        last.usage = response.usage
        final = [*chunks, last]
        final[0].choices[0].logprobs = self._take(None)
        return final

    def _take(self, upto: int | None) -> ChoiceLogprobs | None:
        """The logprobs of the pending tokens whose text ends by character `upto` (None: all), if asked for."""
        n = len(self.pending) if upto is None else sum(1 for t in self.pending if t.end <= upto)
        taken, self.pending = self.pending[:n], self.pending[n:]
        return wire_logprobs(taken) if self.req.logprobs else None

    def _chunk(self, delta: DeltaMessage, finish_reason: str | None = None,
               logprobs: ChoiceLogprobs | None = None) -> ChatChunk:
        return ChatChunk(id=self.id, model=self.backend.binding.name,
                         choices=[ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)])


def _call_deltas(index: int, call: Any) -> list[dict[str, Any]]:
    return [{"index": index, "id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]
