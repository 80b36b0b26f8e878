"""hf_load: a GGUF becomes a plain transformers checkpoint (quantizer removed), cached and reloaded, same logits."""

import json

import pytest

from app.backends import hf_load
from app.errors import BindingError
from app.local_models import resolve_model
from tests.support.requires import require

torch = require("torch")
require("transformers")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "slm-swap" / "models" / "hf"


def test_smollm2_plain_checkpoint_is_saved_reused_and_gives_the_gguf_logits(cache, tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = resolve_model("smollm2-135m")
    ckpt = hf_load.plain_checkpoint("smollm2-135m")
    assert ckpt.parent == cache and ckpt.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((ckpt / "config.json").read_text())
    mtime = (ckpt / "config.json").stat().st_mtime_ns
    assert hf_load.plain_checkpoint(gguf) == ckpt and (ckpt / "config.json").stat().st_mtime_ns == mtime

    model, tok = hf_load.load_base("smollm2-135m", device="cpu")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path / "resaved")  # fails while the GGUF quantizer is attached
    assert (tmp_path / "resaved" / "config.json").is_file()

    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("<|im_start|>user\nWhat is 2+2?<|im_end|>\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind


def test_a_race_loser_uses_the_winners_checkpoint(cache, monkeypatch):
    import shutil

    def a_rival_renamed_first(src, dst):  # another process finished between our check and our rename
        shutil.copytree(src, dst)
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(hf_load.os, "rename", a_rival_renamed_first)
    ckpt = hf_load.plain_checkpoint("smollm2-135m")
    assert (ckpt / "config.json").is_file()
    assert [p.name for p in cache.iterdir()] == [ckpt.name]  # our temp copy is gone


def test_an_unsupported_gguf_architecture_names_the_supported_ones(cache, tmp_path):
    gguf = require("gguf")
    path = tmp_path / "tiny-bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BindingError, match=r"architecture 'bert'.*supported architectures: .*llama.*qwen2"):
        hf_load.load_base(str(path))


def test_a_target_that_is_nothing_says_what_to_give():
    with pytest.raises(BindingError, match="not a model alias, a .gguf file or a model directory"):
        hf_load.load_base("/nonexistent/model-dir")
    with pytest.raises(BindingError, match="dtype 'int3'"):
        hf_load.load_base("smollm2-135m", dtype="int3")


def test_unsloth_only_on_cuda_with_the_package():
    assert hf_load.use_unsloth("cuda", cuda=True, installed=True)
    assert not hf_load.use_unsloth("cpu", cuda=True, installed=True)
    assert not hf_load.use_unsloth("cuda", cuda=True, installed=False)
    assert not hf_load.use_unsloth("cuda:0", cuda=False, installed=True)
    assert hf_load.pick_device("cpu") == "cpu"
    assert hf_load.pick_dtype("auto", "cpu") == torch.float32 and hf_load.pick_dtype("bfloat16", "cpu") == torch.bfloat16


def test_a_peft_adapter_directory_loads_its_base_and_the_adapter(cache, tmp_path):
    peft = require("peft")
    base, _ = hf_load.load_base("smollm2-135m", device="cpu")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(hf_load.plain_checkpoint("smollm2-135m"))
    model, _ = hf_load.load_base(str(tmp_path / "adapter"), device="cpu")
    assert isinstance(model, peft.PeftModel)
    ids = torch.tensor([[1, 2, 3, 4]])
    plain, _ = hf_load.load_base("smollm2-135m", device="cpu")
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits)
