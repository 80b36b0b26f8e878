"""`slmswap train`: LoRA SFT (and DPO) of the real SmolLM2 GGUF for a few steps on a tiny dataset, resume after an
interruption, and the bad input that must stop a run before any weight is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.errors import UsageError
from tests.support.requires import require
from tests.support.cli import slmswap

CITIES = ("Paris", "Tokyo", "Lima", "Oslo")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def openai_rows(cities=CITIES) -> list[dict]:
    return [{"messages": [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]}],
        "tools": TOOLS} for i, city in enumerate(cities)]


def write_openai(folder: Path, rows: list[dict]) -> Path:
    from training.datasets import write_dataset

    write_dataset(folder, {"train": rows, "val": []}, "openai", {"source": "test"})
    return folder


def write_pairs(folder: Path) -> Path:
    from training.datasets import write_dataset

    rows = [{"id": f"p{i}", "route": "r", "why": "wrong_function",
             "prompt": [{"role": "user", "content": f"What is the weather in {city}?"}],
             "chosen": [{"role": "assistant", "content":
                         f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'}],
             "rejected": [{"role": "assistant", "content": "I cannot check the weather."}]}
            for i, city in enumerate(CITIES[:2])]
    write_dataset(folder, {"train": rows, "val": []}, "pairs", {"source": "test"})
    return folder




def options(tmp_path: Path, **kw):
    from training.train import TrainOptions

    base = {"dataset": tmp_path / "ds", "base": "gguf:smollm2-135m", "preset": "subagent", "out": tmp_path / "run",
            "max_steps": 3, "lr": 1e-3, "save_steps": 1, "max_length": 512, "batch_size": 2}
    return TrainOptions(**{**base, **kw})


# ---- presets (no model, no peft import needed for the values) --------------------------------------------

def test_presets_are_the_plans_adapters_on_every_linear_projection():
    import sys

    from training.presets import LINEAR_PROJECTIONS, get_preset

    orch, sub = get_preset("orchestrator"), get_preset("subagent")
    assert (orch.r, orch.alpha, orch.dropout) == (32, 64, 0.05)
    assert (sub.r, sub.alpha, sub.dropout) == (16, 32, 0.05)
    assert set(LINEAR_PROJECTIONS) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for preset in (orch, sub):
        lora, unsloth = preset.lora_kwargs(), preset.unsloth_kwargs(seed=7)
        assert lora["target_modules"] == unsloth["target_modules"] == list(LINEAR_PROJECTIONS)
        assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (preset.r, preset.alpha, preset.dropout)
        assert (unsloth["r"], unsloth["lora_alpha"], unsloth["random_state"]) == (preset.r, preset.alpha, 7)
    assert "unsloth" not in sys.modules  # the Unsloth path is only imported on CUDA
    with pytest.raises(UsageError, match="orchestrator, subagent"):
        get_preset("planner")


def test_lora_config_is_peft_with_the_preset():
    require("peft")
    from training.presets import get_preset, lora_config

    config = lora_config(get_preset("orchestrator"))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (32, 64, 0.05)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---- bad input: stops before any weight is loaded, nothing written --------------------------------------

def test_malformed_row_names_path_and_line_and_trains_nothing(tmp_path, capsys):
    ds = write_openai(tmp_path / "ds", openai_rows())
    lines = (ds / "train.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    (ds / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = slmswap(capsys, "train", "--dataset", str(ds), "--base", "gguf:smollm2-135m", "--preset",
                           "subagent", "--out", str(tmp_path / "run"))
    assert code == 2
    assert f"{ds / 'train.jsonl'}:2" in err and "nothing was trained" in err
    assert not (tmp_path / "run").exists()


def test_pairs_folder_as_dataset_and_sft_folder_as_dpo_are_refused(tmp_path):
    require("gguf")
    from training.train import train

    write_openai(tmp_path / "ds", openai_rows())
    write_pairs(tmp_path / "pairs")
    with pytest.raises(UsageError, match="give it as --dpo"):
        train(options(tmp_path, dataset=tmp_path / "pairs"))
    with pytest.raises(UsageError, match="not preference pairs"):
        train(options(tmp_path, dpo=tmp_path / "ds"))
    assert not (tmp_path / "run").exists()


def write_gguf(path: Path, arch: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_bases_are_refused_naming_what_is_supported(tmp_path, capsys):
    require("gguf")
    require("transformers")
    write_openai(tmp_path / "ds", openai_rows())
    rwkv = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    (tmp_path / "notes.gguf").write_text("not a model\n")
    (tmp_path / "empty-dir").mkdir()
    cases = {f"gguf:{rwkv}": "architecture 'rwkv6'.*supported architectures: llama, .*qwen2",
             f"gguf:{tmp_path / 'notes.gguf'}": "is not a GGUF model file",
             f"gguf:{tmp_path / 'missing.gguf'}": "not found",
             str(tmp_path / "empty-dir"): "neither gguf:<alias|path> nor a transformers model directory",
             "hf:smollm2-135m": "write gguf:smollm2-135m"}
    for base, message in cases.items():
        code, _, err = slmswap(capsys, "train", "--dataset", str(tmp_path / "ds"), "--base", base, "--preset",
                               "subagent", "--out", str(tmp_path / "run"))
        assert code == 2, (base, err)
        assert __import__("re").search(message, err.replace("\n", "")), (base, err)
    assert not (tmp_path / "run").exists()
    from training.train import check_gguf_architecture
    from app.local_models import resolve_model

    assert check_gguf_architecture(resolve_model("smollm2-135m")) == "llama"


def test_unknown_preset_exits_2(tmp_path, capsys):
    write_openai(tmp_path / "ds", openai_rows())
    code, _, err = slmswap(capsys, "train", "--dataset", str(tmp_path / "ds"), "--base", "gguf:smollm2-135m",
                           "--preset", "planner", "--out", str(tmp_path / "run"))
    assert code == 2 and "orchestrator, subagent" in err


# ---- the real model ----------------------------------------------------------------------------------------

def test_loss_is_on_the_answer_tokens_only(tmp_path):
    require("transformers")
    from transformers import AutoTokenizer

    from app.local_models import resolve_model
    from training.datasets import read_dataset
    from training.train import resolve_base, tokenize_rows

    gguf = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    data = read_dataset(write_openai(tmp_path / "ds", openai_rows()))
    rows, dropped = tokenize_rows(data, resolve_base("gguf:smollm2-135m"), tokenizer, 512)
    assert dropped == 0 and len(rows["train"]) == len(CITIES)
    for row, city in zip(rows["train"], CITIES):
        mask = row["completion_mask"]
        answer = tokenizer.decode([t for t, m in zip(row["input_ids"], mask) if m])
        prompt = tokenizer.decode([t for t, m in zip(row["input_ids"], mask) if not m])
        assert mask == sorted(mask)  # the prompt, then the answer, nothing after it
        assert answer.startswith("<tool_call>") and f'"city": "{city}"' in answer and answer.rstrip().endswith("<|im_end|>")
        assert f"What is the weather in {city}?" in prompt and "<tool_call>" not in prompt.split("<|im_start|>")[-1]
    with pytest.raises(UsageError, match="raise --max-length"):
        tokenize_rows(data, resolve_base("gguf:smollm2-135m"), tokenizer, 20)


def lora_b_norms(adapter_dir: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {name: float(t.norm()) for name, t in weights.items() if "lora_B" in name}


@pytest.mark.slow
def test_sft_then_dpo_moves_every_adapter_and_the_loss_falls(tmp_path):
    require("trl")
    require("peft")
    from training.train import train

    write_openai(tmp_path / "ds", openai_rows())
    events = []
    result = train(options(tmp_path, dpo=write_pairs(tmp_path / "pairs"), dpo_max_steps=1), progress=events.append)

    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(run) >= {"base", "base_gguf", "preset", "config", "dataset", "data_hash", "metrics", "adapter"}
    assert (run["base"], run["preset"], run["adapter"], run["status"]) == ("gguf:smollm2-135m", "subagent",
                                                                           "adapter", "done")
    assert run["base_gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and len(run["data_hash"]) == 64
    metrics = run["metrics"]
    assert metrics == result.metrics and metrics["steps"] == 3 and metrics["examples"] == len(CITIES)
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["tokens_per_s"] > 0 and metrics["train_tokens"] > 0
    assert metrics["dpo"]["steps"] == 1 and metrics["dpo"]["pairs"] == 2
    assert [(e.phase, e.step) for e in events] == [("sft", 1), ("sft", 2), ("sft", 3), ("dpo", 1)]

    assert result.adapter_dir == tmp_path / "run" / "adapter"
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert not (result.adapter_dir / "ref").exists()  # DPO's reference copy is not the adapter
    norms = lora_b_norms(result.adapter_dir)
    assert len(norms) == 30 * 7  # SmolLM2-135M: 30 blocks x 7 projections
    assert all(n > 0 for n in norms.values()), [k for k, n in norms.items() if n == 0][:5]  # B starts at zero


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_last_complete_checkpoint(tmp_path, capsys):
    require("trl")
    require("peft")
    from training.train import last_checkpoint, train

    write_openai(tmp_path / "ds", openai_rows())
    seen = []

    def stop_at_3(event):
        seen.append(event.step)
        if event.step == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, after checkpoint-2 was saved

    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, max_steps=4), progress=stop_at_3)
    run_dir = tmp_path / "run"
    assert last_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-2"
    assert json.loads((run_dir / "run.json").read_text())["adapter"] is None  # nothing to export yet
    # A process killed while saving leaves a checkpoint without trainer_state.json: it is skipped.
    (run_dir / "checkpoints" / "checkpoint-3").mkdir()
    (run_dir / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"half")
    assert last_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-2"

    with pytest.raises(UsageError, match="already holds a run; pass --resume"):
        train(options(tmp_path, max_steps=4))
    with pytest.raises(UsageError, match="trained with preset 'subagent'"):
        train(options(tmp_path, max_steps=4, preset="orchestrator", resume=True))

    resumed = []
    result = train(options(tmp_path, max_steps=4, resume=True), progress=lambda e: resumed.append(e.step))
    assert resumed == [3, 4]  # continued after step 2, not from scratch
    assert result.metrics["steps"] == 4 and result.metrics["steps_this_session"] == 2
    assert result.metrics["loss_first"] is not None and result.metrics["loss_last"] < result.metrics["loss_first"]
    assert all(n > 0 for n in lora_b_norms(result.adapter_dir).values())


def cli_train(capsys, tmp_path: Path, run: Path, *extra: str) -> tuple[int, str, str]:
    """`slmswap train` with SFT then DPO on the tiny dataset and pairs of `tmp_path` (the values of `options`)."""
    return slmswap(capsys, "train", "--dataset", str(tmp_path / "ds"), "--base", "gguf:smollm2-135m", "--preset",
                   "subagent", "--out", str(run), "--dpo", str(tmp_path / "pairs"), "--max-steps", "2",
                   "--dpo-max-steps", "3", "--lr", "1e-3", "--save-steps", "1", "--max-length", "512",
                   "--batch-size", "2", *extra)


@pytest.mark.slow
def test_the_cli_trains_and_an_interrupted_dpo_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path, capsys):
    require("trl")
    require("peft")
    from safetensors.torch import load_file

    from training.train import DPO_CHECKPOINTS_DIR, last_checkpoint, train

    write_openai(tmp_path / "ds", openai_rows())
    write_pairs(tmp_path / "pairs")
    # One uninterrupted run through the CLI: the reference, and the CLI's success path.
    whole = tmp_path / "whole"
    code, out, err = cli_train(capsys, tmp_path, whole)
    assert code == 0, err
    ref = json.loads((whole / "run.json").read_text())
    assert (ref["status"], ref["adapter"], ref["base"], ref["preset"]) == ("done", "adapter", "gguf:smollm2-135m",
                                                                           "subagent")
    assert ref["config"]["dpo"] == str(tmp_path / "pairs") and len(ref["data_hash"]) == 64
    assert (ref["metrics"]["steps"], ref["metrics"]["dpo"]["steps"]) == (2, 3)
    assert (whole / "adapter" / "adapter_model.safetensors").is_file()
    assert not (whole / "adapter" / "ref").exists()
    # stdout is the summary table; the progress bar (loss, tok/s) goes to stderr and nowhere else.
    assert "loss_last" in out and "dpo loss_last" in out
    assert "tok/s" in err and "tok/s" not in out
    assert not __import__("re").search(r"^(sft|dpo) ━", out, __import__("re").M)

    # The same run stopped inside DPO, at step 2, after DPO's checkpoint-1 was saved (as Ctrl-C would).
    cut = tmp_path / "cut"

    def stop_in_dpo(event):
        if event.phase == "dpo" and event.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path, out=cut, max_steps=2, dpo=tmp_path / "pairs", dpo_max_steps=3), progress=stop_in_dpo)
    stopped = json.loads((cut / "run.json").read_text())
    assert (stopped["status"], stopped["adapter"], stopped["metrics"]["steps"]) == ("dpo", None, 2)
    assert last_checkpoint(cut, DPO_CHECKPOINTS_DIR) == cut / DPO_CHECKPOINTS_DIR / "checkpoint-1"
    assert (cut / "sft-adapter" / "adapter_model.safetensors").is_file()

    code, out, err = cli_train(capsys, tmp_path, cut, "--resume")
    assert code == 0, err
    resumed = json.loads((cut / "run.json").read_text())
    assert (resumed["status"], resumed["adapter"]) == ("done", "adapter")
    metrics = resumed["metrics"]
    # SFT is not run again (its metrics are the first session's, to the millisecond); DPO runs only steps 2 and 3.
    assert {k: v for k, v in metrics.items() if k != "dpo"} == stopped["metrics"]
    assert (metrics["dpo"]["steps"], metrics["dpo"]["steps_this_session"]) == (3, 2)
    # ... and ends where the uninterrupted run ended: same optimizer, schedule, data order and reference adapter
    # (a reference taken from the partly trained adapter, or DPO restarted from scratch, changes these).
    assert metrics["dpo"]["loss_first"] == pytest.approx(ref["metrics"]["dpo"]["loss_first"], rel=1e-4)
    assert metrics["dpo"]["loss_last"] == pytest.approx(ref["metrics"]["dpo"]["loss_last"], rel=1e-3, abs=1e-5)
    got, want = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (cut, whole))
    assert set(got) == set(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5
