"""transformers (+ a peft adapter) for `hf:<target>` bindings, with the same prompt format, tool codec and grammar
as the llama.cpp backend.

`<target>` is an alias (`hf:smollm2-135m`), a `.gguf` file (loaded dequantised as a cached plain checkpoint,
`app/backends/hf_load.py`), an HF model directory or a peft adapter directory. The prompt is rendered by
`chat_format.prompt_format_for(target)` (what llama.cpp serves the same GGUF with), tools and tool results go through
the Hermes codec, and a request's tools / response_format become the same llguidance grammar (`grammar.py`) applied
to the logits at every step. Decoding is a plain token loop with a KV cache: stop sequences, streaming and usage
come from it. torch and transformers are imported on first use.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.backends import chat_format
from app.backends.grammar import TEXT_TAGS, TokenMask, ToolTags, compiled_matcher, request_lark
from app.bindings import Binding
from app.errors import BackendError, MissingDependency, SlmSwapError
from app.hermes import TOOL_CLOSE, TOOL_OPEN
from app.toolplan import ToolPlan, request_plan
from app.wire import (AssistantMessage, ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, DeltaMessage,
                      Usage)

DEFAULT_MAX_TOKENS = 512


@dataclass
class HFModel:
    model: Any
    tokenizer: Any
    fmt: chat_format.PromptFormat
    eog: frozenset[int]
    tags: ToolTags
    lock: threading.Lock = field(default_factory=threading.Lock)
    _ll: Any = None

    def lltokenizer(self) -> Any:
        if self._ll is None:
            from llguidance.hf import from_tokenizer

            self._ll = from_tokenizer(self.tokenizer, eos_token=sorted(self.eog))
        return self._ll


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class HFBackend:
    def __init__(self, binding: Binding):
        self.binding = binding
        self._loaded: HFModel | None = None
        self._load_lock = threading.Lock()

    def model(self) -> HFModel:
        with self._load_lock:
            if self._loaded is None:
                self._loaded = load(self.binding.target, self.binding.options.device, self.binding.options.dtype)
            return self._loaded

    async def complete(self, req: ChatRequest) -> ChatResponse:
        gen, plan = await asyncio.to_thread(self.run, req)
        return to_response(gen, plan, self.binding.name)

    def run(self, req: ChatRequest, on_text: Callable[[str], None] | None = None) -> tuple[Generation, ToolPlan]:
        plan = request_plan(req)
        m = self.model()
        prompt = m.fmt.render(req.messages, plan.functions)
        lark = request_lark(req, m.tags)
        with m.lock:
            mask = TokenMask(compiled_matcher(m.lltokenizer(), lark), m.lltokenizer().vocab_size) if lark else None
            try:
                return generate(m, prompt, req, mask, on_text), plan
            except SlmSwapError:
                raise
            except (RuntimeError, ValueError, IndexError) as exc:
                raise BackendError(f"{self.binding.name}: transformers failed while generating: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Text deltas as they are decoded (held back while they could still become a stop sequence or a tool
        call tag); a request with tools gets its parsed calls in the last chunk."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stops = _stops(req)
        has_tools = request_plan(req).mode != "none"
        sent = [0]

        def on_text(text: str) -> None:
            if has_tools:
                return
            end = len(text) - chat_format.held_back(text, stops)
            if end > sent[0]:
                loop.call_soon_threadsafe(queue.put_nowait, ("delta", text[sent[0]:end]))
                sent[0] = end

        def work() -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ("done", self.run(req, on_text)))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        threading.Thread(target=work, daemon=True).start()
        rid = "chatcmpl-" + uuid.uuid4().hex
        first = True
        while True:
            kind, value = await queue.get()
            if kind == "error":
                raise value
            if kind == "delta":
                chunk = ChatChunk(id=rid, model=self.binding.name, choices=[ChunkChoice(delta=DeltaMessage(role="assistant" if first else None,
                                                                          content=value))])
                first = False
                yield chunk
                continue
            gen, plan = value
            resp = to_response(gen, plan, self.binding.name)
            msg = resp.message
            rest = (msg.content or "")[sent[0]:] if not has_tools else msg.content
            if rest or msg.tool_calls or first:
                yield ChatChunk(id=rid, model=self.binding.name, choices=[ChunkChoice(delta=DeltaMessage(
                    role="assistant" if first else None, content=rest or None,
                    tool_calls=_indexed(msg.tool_calls)))])
            yield ChatChunk(id=rid, model=self.binding.name, choices=[ChunkChoice(delta=DeltaMessage(),
                                                                    finish_reason=resp.choices[0].finish_reason)],
                            usage=resp.usage)
            return


def _indexed(calls: Any) -> Any:
    if not calls:
        return None
    return [{"index": i, "id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}} for i, c in enumerate(calls)]


def _stops(req: ChatRequest) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return [s for s in stop if s]


def load(target: str, device: str = "auto", dtype: str = "auto") -> HFModel:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependency("hf: bindings need the train extra: pip install -e '.[train]' (or make test)") from None
    from app.backends import hf_load

    model, tokenizer = hf_load.load_base(target, device, dtype)
    fmt = chat_format.prompt_format_for(str(hf_load.resolve_dir(target)))
    eog = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eot = tokenizer.convert_tokens_to_ids(fmt.end_of_turn)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        eog.add(eot)
    return HFModel(model, tokenizer, fmt, frozenset(eog), _tags(tokenizer))


def _tags(tokenizer: Any) -> ToolTags:
    """A tag the tokenizer holds as one added token (Qwen2.5's <tool_call>) is that token in the grammar."""
    added = set(tokenizer.added_tokens_decoder)

    def one(tag: str) -> int | None:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and ids[0] in added else None

    return ToolTags(open=one(TOOL_OPEN), close=one(TOOL_CLOSE)) if added else TEXT_TAGS


def generate(m: HFModel, prompt: str, req: ChatRequest, mask: TokenMask | None,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Decode token by token (KV cache): greedy at temperature 0, else temperature/top-p sampling with the seed."""
    import torch

    ids, _ = chat_format.training_ids(m.tokenizer, prompt, "")
    device = next(m.model.parameters()).device
    budget = req.token_limit(DEFAULT_MAX_TOKENS)
    stops = _stops(req)
    temperature = 0.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    gen = torch.Generator().manual_seed(req.seed or 0)
    out: list[int] = []
    text, finish = "", "length"
    from transformers import DynamicCache

    cache = DynamicCache(config=m.model.config)  # updated in place at every step
    step = torch.tensor([ids], device=device)
    with torch.no_grad():
        for _ in range(budget):
            res = m.model(input_ids=step, cache=cache, use_cache=True)
            logits = res.logits[0, -1].float().cpu()
            if mask is not None:
                allowed = torch.from_numpy(mask.allowed().copy())
                n = allowed.shape[0]
                logits[:n][~allowed] = float("-inf")
                logits[n:] = float("-inf")
            token = _pick(logits, temperature, top_p, gen)
            if mask is not None:
                mask.consume(token)
            if token in m.eog:
                finish = "stop"
                break
            out.append(token)
            text = m.tokenizer.decode(out, skip_special_tokens=False)
            hit = _first_stop(text, stops)
            if hit is not None:
                text, finish = text[:hit], "stop"
                break
            if on_text:
                on_text(text)
            if mask is not None and mask.done:
                finish = "stop"
                break
            step = torch.tensor([[token]], device=device)
    return Generation(text, len(ids), len(out), finish)


def _pick(logits: Any, temperature: float, top_p: float, gen: Any) -> int:
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def to_response(gen: Generation, plan: ToolPlan, model_name: str) -> ChatResponse:
    content, calls = chat_format.parse_tool_calls(gen.text) if plan.mode != "none" else (gen.text, [])
    finish = "tool_calls" if calls and gen.finish_reason != "length" else gen.finish_reason
    usage = Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                  total_tokens=gen.prompt_tokens + gen.completion_tokens)
    return ChatResponse(model=model_name, created=int(time.time()),
                        choices=[Choice(message=AssistantMessage(content=content, tool_calls=calls or None),
                                        finish_reason=finish)], usage=usage)
