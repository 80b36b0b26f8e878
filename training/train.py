"""LoRA fine-tuning of a local base on a dataset folder: what `slmswap train` and the learning loop call.

Rows are rendered with the prompt format the base is *served* with (`chat_format.training_text`) and tokenized
by `chat_format.training_ids`, so the tokens trained on are the tokens llama.cpp later sees, and the loss falls
on the answer only (its completion mask). SFT runs trl's `SFTTrainer` with a peft LoRA from the preset
(`training/presets.py`); `dpo` then runs trl's `DPOTrainer` on the same adapter (its reference is the base with
the adapter disabled, trl's default for a peft model). On CUDA with Unsloth installed, Unsloth's
`FastLanguageModel` builds the model and adapter instead (imported only there).

The run folder (H3's export and the loop read exactly this layout):

    RUN/run.json            {"base": binding, "base_gguf": path or null, "preset": name, "config": {...},
                             "dataset": DIR, "data_hash": sha256 of the split files, "status": training|dpo|done,
                             "metrics": {"loss_first", "loss_last", "steps", "tokens_per_s", "train_tokens",
                                         "examples", "dropped_too_long", "runtime_s", "val_loss"?, "dpo"?},
                             "adapter": "adapter" (null until training is done)}
    RUN/adapter/            the peft adapter (adapter_config.json + adapter_model.safetensors, save_pretrained)
    RUN/checkpoints/checkpoint-N/   trainer checkpoints (the newest few). A checkpoint counts once its
                             trainer_state.json is written (the trainer writes it last), so a run killed while
                             saving leaves the previous one usable, and `resume=True` continues from it.
    RUN/sft-adapter/        with `dpo`: the adapter SFT ended with; run.json then says status "dpo" and holds
                             SFT's metrics, so a resumed run skips SFT and starts DPO from this adapter
    RUN/checkpoints-dpo/checkpoint-N/   DPO's checkpoints (the "default" adapter and trl's "ref" copy of the SFT
                             adapter, optimizer, scheduler, RNG); a resumed DPO continues from the newest complete one.

Example:
    from training.train import TrainOptions, train
    result = train(TrainOptions(dataset=Path("ds"), base="gguf:smollm2-135m", preset="subagent", out=Path("run")))
    result.adapter_dir  # run/adapter
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import MissingDependency, UsageError
from training.datasets import SPLITS, LoadedDataset, read_dataset
from training.presets import Preset, get_preset, lora_config

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
DPO_CHECKPOINTS_DIR = "checkpoints-dpo"
SFT_ADAPTER_DIR = "sft-adapter"
# transformers reads these GGUF architectures (transformers.modeling_gguf_pytorch_utils); the trainer needs a
# decoder-only one. Checked against that list at run time too, so a newer transformers cannot widen it silently.
CAUSAL_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma2",
                             "gemma3", "stablelm", "starcoder2", "falcon", "gpt2", "nemotron", "lfm2")


@dataclass
class TrainOptions:
    dataset: Path  # a folder written by `slmswap dataset build|from-bfcl` (openai or hermes rows)
    base: str  # gguf:<alias|path>, or an HF model directory (hf:<dir> or the bare path)
    preset: str  # orchestrator | subagent
    out: Path  # the run folder
    dpo: Path | None = None  # a folder written by `slmswap dataset pairs`
    max_steps: int | None = None  # wins over epochs when set
    epochs: float | None = None  # default: the preset's
    lr: float | None = None  # default: the preset's
    resume: bool = False
    seed: int = 0
    max_length: int | None = None  # tokens per example (default: the preset's); longer examples are left out
    batch_size: int | None = None
    save_steps: int = 50
    device: str = "auto"  # auto | cpu | cuda
    unsloth: bool = True  # use Unsloth when on CUDA and installed
    dpo_max_steps: int | None = None
    dpo_beta: float = 0.1


@dataclass(frozen=True)
class TrainProgress:
    """One logged step, as `progress` callbacks receive it."""

    phase: str  # sft | dpo
    step: int
    max_steps: int
    loss: float | None
    tokens_per_s: float | None


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResumePoint:
    """Where a `resume=True` run continues: inside SFT (its checkpoint), or after it, inside DPO."""

    sft_checkpoint: Path | None = None  # SFT continues from here (None: SFT finished in an earlier session)
    sft_metrics: dict[str, Any] | None = None  # SFT's metrics when it finished earlier (then DPO comes next)
    dpo_checkpoint: Path | None = None  # DPO continues from here (None: DPO starts from RUN/sft-adapter)

    @property
    def sft_done(self) -> bool:
        return self.sft_metrics is not None


@dataclass(frozen=True)
class Base:
    binding: str
    target: str  # what hf_load.load_base and chat_format.prompt_format_for take: an alias, .gguf path or dir
    gguf: Path | None  # the GGUF file llama.cpp serves, or None for an HF directory


ProgressFn = Callable[[TrainProgress], None]


def train(options: TrainOptions, progress: ProgressFn | None = None) -> TrainResult:
    """Fine-tune `options.base` on `options.dataset` into `options.out` (layout in the module docstring).

    Bad input (dataset row, base, run folder, preset) raises UsageError before any weight is loaded. An
    interrupted run (KeyboardInterrupt from Ctrl-C or from `progress`) propagates, leaving its last checkpoint.
    """
    preset = get_preset(options.preset)
    base = resolve_base(options.base)
    data = read_training_rows(options.dataset)
    pairs = read_pair_rows(options.dpo) if options.dpo else None
    data_hash = dataset_hash(options.dataset, options.dpo)
    resume = check_run_folder(options, base, data_hash)
    config = run_config(options, preset)
    if not resume.sft_done:
        _write_run(options.out, base, options, config, data_hash, status="training", metrics={}, adapter=None)

    engine = _Engine.start(base, preset, options)
    if resume.sft_done:  # interrupted inside DPO: SFT is not run again
        metrics = dict(resume.sft_metrics or {})
        _load_adapter(engine, options.out / SFT_ADAPTER_DIR)
    else:
        rows, dropped = tokenize_rows(data, base, engine.tokenizer, config["max_length"])
        metrics = _sft(engine, rows, data.splits.get("val"), base, config, options, resume.sft_checkpoint, progress)
        metrics["examples"], metrics["dropped_too_long"] = len(rows["train"]), dropped
        if pairs is not None:  # SFT's end is where an interrupted DPO restarts
            engine.model.save_pretrained(str(options.out / SFT_ADAPTER_DIR))
            _write_run(options.out, base, options, config, data_hash, status="dpo", metrics=metrics, adapter=None)
    if pairs is not None:
        metrics["dpo"] = _dpo(engine, pairs, base, config, options, progress, resume.dpo_checkpoint)
    adapter_dir = options.out / ADAPTER_DIR
    # After DPO the model also holds "ref" (trl's copy of the SFT adapter, its reference): save only "default".
    engine.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    _write_run(options.out, base, options, config, data_hash, status="done", metrics=metrics, adapter=ADAPTER_DIR)
    return TrainResult(options.out, adapter_dir, metrics)


# ---- checking the input ----------------------------------------------------------------------------------

def resolve_base(binding: str) -> Base:
    """`gguf:<alias|path>` (checked to be a GGUF of an architecture the trainer reads) or an HF model directory."""
    from app.local_models import ALIASES, resolve_model

    text = binding.strip()
    if text.startswith("gguf:"):
        target = text[len("gguf:"):].partition("?")[0]
        path = resolve_model(target)
        check_gguf_architecture(path)
        return Base(text, target, path)
    target = text[len("hf:"):] if text.startswith("hf:") else text
    if target in ALIASES:
        raise UsageError(f"--base {binding}: write gguf:{target} to train on the GGUF that llama.cpp serves")
    path = Path(target).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        check_gguf_architecture(path)
        return Base(text, str(path), path)
    if path.is_dir() and (path / "config.json").is_file():
        return Base(text, str(path), None)
    raise UsageError(f"--base {binding} is neither gguf:<alias|path> nor a transformers model directory (with "
                     f"config.json); e.g. --base gguf:smollm2-135m (aliases: {', '.join(ALIASES)})")


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (hf_load reads it); UsageError when the file is not GGUF."""
    from app.backends import hf_load

    try:
        arch = hf_load.gguf_architecture(path)
    except ImportError:
        raise MissingDependency("training needs the train extra: pip install -e '.[train]'") from None
    except (ValueError, OSError, IndexError) as exc:
        raise UsageError(f"{path} is not a GGUF model file ({exc}); give a .gguf file or an alias") from None
    if not arch:
        raise UsageError(f"{path} has no general.architecture; it is not a GGUF model file llama.cpp can serve")
    return arch


def supported_architectures() -> tuple[str, ...]:
    """The GGUF architectures transformers loads (hf_load) that are decoder-only, so the trainer can use them."""
    from app.backends import hf_load

    try:
        loadable = hf_load.supported_architectures()
    except MissingDependency:
        raise MissingDependency("training needs the train extra: pip install -e '.[train]'") from None
    return tuple(a for a in CAUSAL_GGUF_ARCHITECTURES if a in loadable)


def check_gguf_architecture(path: Path) -> str:
    arch = gguf_architecture(path)
    supported = supported_architectures()
    if arch not in supported:
        raise UsageError(f"{path} is a GGUF of architecture {arch!r}, which the trainer cannot load; supported "
                         f"architectures: {', '.join(supported)}")
    return arch


def read_training_rows(folder: Path) -> LoadedDataset:
    """Every row checked (path:line of the first bad one, nothing trained); pairs folders are refused here."""
    data = read_dataset(folder)
    if data.kind == "pairs":
        raise UsageError(f"{folder} holds preference pairs; give it as --dpo, and an SFT dataset (dataset build "
                         "or from-bfcl) as --dataset")
    return data


def read_pair_rows(folder: Path) -> LoadedDataset:
    data = read_dataset(folder)
    if data.kind != "pairs":
        raise UsageError(f"--dpo {folder} holds {data.kind} rows, not preference pairs; write them with "
                         "`slmswap dataset pairs --out DIR`")
    return data


def dataset_hash(folder: Path, pairs: Path | None = None) -> str:
    """SHA-256 over the split files (and the pairs' split files), in a fixed order."""
    digest = hashlib.sha256()
    for root in (folder, pairs):
        for name in SPLITS if root else ():
            path = root / f"{name}.jsonl"
            if path.exists():
                digest.update(f"{root.name}/{name}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def check_run_folder(options: TrainOptions, base: Base, data_hash: str) -> ResumePoint:
    """Where to resume (nothing set for a fresh run); UsageError when the folder does not fit the request."""
    out, stored = options.out, _read_run(options.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    if not options.resume:
        if stored is not None or (out.exists() and any(out.iterdir())):
            raise UsageError(f"--out {out} already holds a run; pass --resume to continue it, or give a new folder "
                             "(nothing was overwritten)")
        return ResumePoint()
    if stored is None:
        raise UsageError(f"--resume: {out} holds no run ({RUN_FILE} is missing); start it without --resume")
    for key, now in (("base", base.binding), ("preset", options.preset), ("data_hash", data_hash)):
        if stored.get(key) != now:
            raise UsageError(f"--resume: {out} was trained with {key} {stored.get(key)!r}, not {now!r}; resume with "
                             "the same --base, --preset, --dataset and --dpo, or start a new run")
    if stored.get("status") == "dpo":
        if not (out / SFT_ADAPTER_DIR / "adapter_config.json").is_file():
            raise UsageError(f"--resume: {out} finished SFT but {out / SFT_ADAPTER_DIR} is missing; start again "
                             "without --resume in a new folder")
        return ResumePoint(sft_metrics=dict(stored.get("metrics") or {}),
                           dpo_checkpoint=last_checkpoint(out, DPO_CHECKPOINTS_DIR))
    checkpoint = last_checkpoint(out)
    if checkpoint is None:
        raise UsageError(f"--resume: {out / CHECKPOINTS_DIR} holds no complete checkpoint; start again without "
                         "--resume in a new folder")
    return ResumePoint(sft_checkpoint=checkpoint)


def last_checkpoint(run_dir: Path, folder: str = CHECKPOINTS_DIR) -> Path | None:
    """The newest checkpoint in RUN/`folder` (SFT's, or DPO_CHECKPOINTS_DIR) whose trainer_state.json parses (the
    trainer writes it after the weights)."""
    folders = sorted((p for p in (run_dir / folder).glob("checkpoint-*") if p.name[11:].isdigit()),
                     key=lambda p: int(p.name[11:]), reverse=True)
    for folder in folders:
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return folder
    return None


def _read_run(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{out / RUN_FILE} cannot be read ({exc}); start a new run in a new folder") from None


def run_config(options: TrainOptions, preset: Preset) -> dict[str, Any]:
    return {"preset": preset.as_dict(), "max_steps": options.max_steps,
            "epochs": options.epochs if options.epochs is not None else preset.epochs,
            "learning_rate": options.lr if options.lr is not None else preset.learning_rate,
            "batch_size": options.batch_size or preset.batch_size, "grad_accum": preset.grad_accum,
            "max_length": options.max_length or preset.max_length, "seed": options.seed,
            "save_steps": options.save_steps, "dpo": str(options.dpo) if options.dpo else None,
            "dpo_max_steps": options.dpo_max_steps, "dpo_beta": options.dpo_beta}


def _write_run(out: Path, base: Base, options: TrainOptions, config: dict[str, Any], data_hash: str, *,
               status: str, metrics: dict[str, Any], adapter: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"base": base.binding, "base_gguf": str(base.gguf) if base.gguf else None, "preset": options.preset,
              "config": config, "dataset": str(options.dataset), "data_hash": data_hash, "status": status,
              "metrics": metrics, "adapter": adapter}
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / RUN_FILE)  # atomic: a killed run never leaves half a run.json


# ---- rows to tokens --------------------------------------------------------------------------------------

_HERMES_ROLE = {"system": "system", "human": "user", "gpt": "assistant"}


def conversation(row: dict[str, Any], kind: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None,
                                                          dict[str, Any]]:
    """(messages before the answer, tools, answer message) of an openai or hermes row.

    Hermes rows are already rendered by the codec (tools inside the system text), so their turns are passed as
    plain messages without tools and come out as the same text.
    """
    if kind == "openai":
        return row["messages"][:-1], row.get("tools") or None, row["messages"][-1]
    turns = [{"role": _HERMES_ROLE[t["from"]], "content": t["value"]} for t in row["conversations"]]
    return turns[:-1], None, turns[-1]


def tokenize_rows(data: LoadedDataset, base: Base, tokenizer: Any, max_length: int
                  ) -> tuple[dict[str, list[dict[str, list[int]]]], int]:
    """Per split, {input_ids, completion_mask} rows in the serving format; how many were longer than max_length."""
    fmt = _formats().prompt_format_for(base.target)
    out: dict[str, list[dict[str, list[int]]]] = {}
    dropped = 0
    for name, split_rows in data.splits.items():
        out[name] = []
        for row in split_rows:
            messages, tools, answer = conversation(row, data.kind)
            prompt, completion = _formats().training_text(fmt, messages, tools, answer)
            ids, mask = _formats().training_ids(tokenizer, prompt, completion)
            if len(ids) > max_length:
                dropped += 1
                continue
            out[name].append({"input_ids": list(ids), "completion_mask": list(mask)})
    if not out.get("train"):
        raise UsageError(f"every training example is longer than {max_length} tokens; raise --max-length "
                         "(nothing was trained)")
    return out, dropped


def _formats() -> Any:
    """The one prompt format module (serving and training share it)."""
    from app.backends import chat_format

    return chat_format


# ---- the model -------------------------------------------------------------------------------------------

@dataclass
class _Engine:
    model: Any
    tokenizer: Any
    peft_config: Any  # None when the model already carries its adapter (Unsloth, or a resumed DPO)
    device: str
    kind: str  # trl | unsloth

    @classmethod
    def start(cls, base: Base, preset: Preset, options: TrainOptions) -> _Engine:
        try:
            import torch
        except ImportError:
            raise MissingDependency("training needs the train extra: pip install -e '.[train]'") from None
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
        if device == "cuda" and options.unsloth and _has_unsloth():
            return cls._unsloth(base, preset, options)
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        model, tokenizer = _load_base(base.target, device, dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, lora_config(preset), device, "trl")

    @classmethod
    def _unsloth(cls, base: Base, preset: Preset, options: TrainOptions) -> _Engine:
        from unsloth import FastLanguageModel  # CUDA only; patches transformers on import

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(_plain_checkpoint(base)), max_seq_length=options.max_length or preset.max_length,
            dtype=None, load_in_4bit=False)
        model = FastLanguageModel.get_peft_model(model, **preset.unsloth_kwargs(options.seed))
        return cls(model, tokenizer, None, "cuda", "unsloth")


def _has_unsloth() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def _load_base(target: str, device: str, dtype: str) -> tuple[Any, Any]:
    from app.backends.hf_load import load_base

    return load_base(target, device, dtype)


def _plain_checkpoint(base: Base) -> Path:
    """A transformers directory of the base, for Unsloth (a GGUF base: hf_load's dequantised cache)."""
    if base.gguf is None:
        return Path(base.target)
    from app.backends import hf_load

    return Path(hf_load.plain_checkpoint(base.gguf))


# ---- SFT and DPO -----------------------------------------------------------------------------------------

def _sft(engine: _Engine, rows: dict[str, list[dict[str, list[int]]]], val_rows: Any, base: Base,
         config: dict[str, Any], options: TrainOptions, resume_from: Path | None,
         progress: ProgressFn | None) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # trl turns gradient checkpointing on by default; it saves memory that only a GPU run needs and costs time on CPU.
    args = SFTConfig(
        output_dir=str(options.out / CHECKPOINTS_DIR), max_steps=options.max_steps or -1,
        num_train_epochs=config["epochs"], learning_rate=config["learning_rate"],
        per_device_train_batch_size=config["batch_size"], gradient_accumulation_steps=config["grad_accum"],
        warmup_steps=_warmup_steps(config, len(rows["train"])), logging_steps=1, save_strategy="steps",
        save_steps=options.save_steps, save_total_limit=2, seed=options.seed, data_seed=options.seed,
        report_to="none", disable_tqdm=True, completion_only_loss=True, max_length=None,
        use_cpu=engine.device == "cpu", bf16=engine.device == "cuda" and _bf16(), dataloader_num_workers=0,
        gradient_checkpointing=engine.device == "cuda")
    callback = _progress_callback("sft", progress)
    trainer = SFTTrainer(model=engine.model, args=args, train_dataset=Dataset.from_list(rows["train"]),
                         eval_dataset=Dataset.from_list(rows["val"]) if rows.get("val") else None,
                         processing_class=engine.tokenizer, peft_config=engine.peft_config, callbacks=[callback])
    _quiet(trainer)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    engine.model, engine.peft_config = trainer.model, None
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics: dict[str, Any] = {
        "engine": engine.kind, "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None, "steps": trainer.state.global_step,
        "steps_this_session": callback.steps, "tokens_per_s": callback.tokens_per_s(),
        "train_tokens": callback.tokens, "runtime_s": round(callback.elapsed(), 3)}
    if rows.get("val"):
        metrics["val_loss"] = trainer.evaluate().get("eval_loss")
    return metrics


def _quiet(trainer: Any) -> None:
    """No log dicts printed on stdout (the trainer prints them when its tqdm is off): `progress` reports steps."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _warmup_steps(config: dict[str, Any], n_rows: int) -> int:
    per_epoch = math.ceil(n_rows / (config["batch_size"] * config["grad_accum"]))
    total = config["max_steps"] or math.ceil(per_epoch * config["epochs"])
    return int(total * config["preset"]["warmup_ratio"])


def _bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def pair_texts(data: LoadedDataset, base: Base) -> dict[str, list[dict[str, str]]]:
    """Pair rows as trl's standard (text) preference rows, rendered in the base's serving format."""
    fmt = _formats().prompt_format_for(base.target)
    out: dict[str, list[dict[str, str]]] = {}
    for name, split_rows in data.splits.items():
        out[name] = []
        for row in split_rows:
            texts = {}
            for side in ("chosen", "rejected"):
                prompt, completion = _formats().training_text(fmt, row["prompt"], None, row[side][-1])
                texts["prompt"], texts[side] = prompt, completion
            out[name].append(texts)
    return out


def _dpo(engine: _Engine, pairs: LoadedDataset, base: Base, config: dict[str, Any], options: TrainOptions,
         progress: ProgressFn | None, resume_from: Path | None = None) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    texts = pair_texts(pairs, base)
    args = DPOConfig(
        output_dir=str(options.out / DPO_CHECKPOINTS_DIR), max_steps=options.dpo_max_steps or -1,
        num_train_epochs=1, learning_rate=config["learning_rate"] / 4, beta=options.dpo_beta,
        per_device_train_batch_size=min(config["batch_size"], 2), logging_steps=1, save_strategy="steps",
        save_steps=options.save_steps, save_total_limit=2, seed=options.seed, data_seed=options.seed,
        report_to="none", disable_tqdm=True, max_length=config["max_length"],
        use_cpu=engine.device == "cpu", bf16=engine.device == "cuda" and _bf16(), dataloader_num_workers=0,
        gradient_checkpointing=engine.device == "cuda")
    callback = _progress_callback("dpo", progress)
    trainer = DPOTrainer(model=engine.model, args=args, train_dataset=Dataset.from_list(texts["train"]),
                         processing_class=engine.tokenizer, callbacks=[callback])
    _quiet(trainer)
    # On resume the trainer loads both adapters of the checkpoint ("default" and trl's "ref"), so the reference
    # stays the SFT adapter, not the partly trained one.
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    engine.model = trainer.model
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "steps": trainer.state.global_step, "steps_this_session": callback.steps, "pairs": len(texts["train"]),
            "beta": options.dpo_beta}


def _load_adapter(engine: _Engine, folder: Path) -> None:
    """Put the adapter saved in `folder` (SFT's end) on the engine's model, trainable, as its "default" adapter."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if engine.peft_config is not None:  # a plain base (trl engine): the preset's LoRA, as SFT built it
        engine.model, engine.peft_config = get_peft_model(engine.model, engine.peft_config), None
    loaded = set_peft_model_state_dict(engine.model, load_peft_weights(str(folder), device="cpu"))
    if loaded.unexpected_keys:
        raise UsageError(f"{folder} does not fit the preset's adapter ({loaded.unexpected_keys[0]}); start again "
                         "without --resume in a new folder")


def _progress_callback(phase: str, progress: ProgressFn | None) -> Any:
    """A trainer callback (built here, so importing this module needs no transformers)."""
    from transformers import TrainerCallback

    class ProgressCallback(_ProgressMixin, TrainerCallback):
        pass

    callback = ProgressCallback()
    callback.setup(phase, progress)
    return callback


class _ProgressMixin:
    """Reports each logged step to `progress`; measures tokens/s over this session's steps."""

    def setup(self, phase: str, progress: ProgressFn | None) -> None:
        self.phase, self.progress = phase, progress
        self.started: float | None = None
        self.steps = self.tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        self.steps = state.global_step - self.first_step
        self.tokens = int(logs.get("num_tokens") or 0)  # trl counts this session's tokens (not restored on resume)
        if self.progress:
            self.progress(TrainProgress(self.phase, state.global_step, state.max_steps, logs.get("loss"),
                                        self.tokens_per_s()))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started if self.started is not None else 0.0

    def tokens_per_s(self) -> float | None:
        elapsed = self.elapsed()
        return round(self.tokens / elapsed, 1) if self.tokens and elapsed > 0 else None
