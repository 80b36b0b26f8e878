"""LoRA presets for `slmswap train --preset`: the adapter shape and the default schedule per kind of route.

From the plan: the orchestrator (a planner that writes structured plans) gets a wider adapter than a sub-agent
(one narrow tool-calling job). Every linear projection of the attention and MLP blocks is adapted. Pure data: the
peft and Unsloth arguments are built here without importing either, so the presets are tested without a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from app.errors import UsageError

# The linear projections of a Llama/Qwen/Gemma/Phi-style decoder block (names as transformers writes them).
LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    name: str
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...] = LINEAR_PROJECTIONS
    learning_rate: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024  # tokens per example; longer ones are cut (the answer is at the end: keep_end)
    warmup_ratio: float = 0.03

    def lora_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `peft.LoraConfig` for this preset."""
        return {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.target_modules), "bias": "none", "task_type": "CAUSAL_LM"}

    def unsloth_kwargs(self, seed: int = 0) -> dict[str, Any]:
        """Keyword arguments of Unsloth's `FastLanguageModel.get_peft_model` for the same adapter."""
        return {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.target_modules), "bias": "none",
                "use_gradient_checkpointing": "unsloth", "random_state": seed}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules)}


PRESETS: dict[str, Preset] = {
    "orchestrator": Preset("orchestrator", r=32, alpha=64, dropout=0.05),
    "subagent": Preset("subagent", r=16, alpha=32, dropout=0.05),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is a UsageError listing the presets.

    >>> get_preset("subagent").r
    16
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"--preset {name!r} is unknown; use one of: {', '.join(PRESETS)}") from None


def lora_config(preset: Preset) -> Any:
    """The `peft.LoraConfig` of a preset (peft is imported here, not at module load)."""
    from peft import LoraConfig

    return LoraConfig(**preset.lora_kwargs())
