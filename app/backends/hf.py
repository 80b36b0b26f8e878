"""transformers (+ a peft adapter when the path holds one) for `hf:<path>` bindings.

`<path>` is a model or peft adapter directory, a `.gguf` file, or a built-in GGUF alias (`hf:smollm2-135m`):
transformers loads GGUF files directly, dequantised, so the weights llama.cpp serves can be run (and fine-tuned) on
CPU. Thin for now: plain text, no grammar, no Unsloth (the training issue completes it). torch and transformers are
imported on first use, so the base install never needs them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from app.bindings import Binding
from app.errors import MissingDependency
from app.wire import AssistantMessage, ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, DeltaMessage, Usage


class HFBackend:
    def __init__(self, binding: Binding):
        self.binding = binding
        self._loaded: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                self._loaded = load_model(model_path(self.binding.target), self.binding.options.device)
            return self._loaded

    async def complete(self, req: ChatRequest) -> ChatResponse:
        return await asyncio.to_thread(self._generate, req)

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        resp = await self.complete(req)
        yield ChatChunk(id=resp.id, choices=[ChunkChoice(delta=DeltaMessage(role="assistant", content=resp.message.content))])
        yield ChatChunk(id=resp.id, choices=[ChunkChoice(delta=DeltaMessage(), finish_reason="stop")], usage=resp.usage)

    def _generate(self, req: ChatRequest) -> ChatResponse:
        import torch

        model, tokenizer = self._load()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"].to(model.device)
        with self._lock, torch.no_grad():
            out = model.generate(ids, max_new_tokens=req.token_limit(), do_sample=bool(req.temperature),
                                 temperature=req.temperature or None)
        new = out[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        usage = Usage(prompt_tokens=ids.shape[1], completion_tokens=len(new), total_tokens=ids.shape[1] + len(new))
        return ChatResponse(created=int(time.time()), choices=[Choice(message=AssistantMessage(content=text))], usage=usage)


def model_path(target: str) -> Path:
    """A built-in alias's GGUF file, or the target as a path."""
    from app.local_models import ALIASES, resolve_model

    return resolve_model(target) if target in ALIASES else Path(target)


def load_model(path: Path, device: str) -> tuple[Any, Any]:
    """(model, tokenizer); a peft adapter directory loads its base model and the adapter on top."""
    try:
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise MissingDependency("hf: bindings need the train extra: pip install -e '.[train]' (or make test)") from None
    if not path.exists():
        raise MissingDependency(f"hf:{path}: no such file or directory; give a transformers model or peft adapter "
                                "directory, a .gguf file, or an alias (smollm2-135m, gemma3-270m)")
    if path.suffix == ".gguf":
        gguf = {"gguf_file": path.name}
        return (AutoModelForCausalLM.from_pretrained(path.parent, **gguf).eval(),
                AutoTokenizer.from_pretrained(path.parent, **gguf))
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)
