"""Loading a base model for transformers: a built-in alias, a `.gguf` file, an HF model directory or a peft adapter.

A GGUF is read by transformers dequantised; its quantizer is then removed (`hf_quantizer.remove_quantization_config`)
because without that the trainer refuses the model and `save_pretrained` fails. The result is cached once as a plain
checkpoint (model + tokenizer) under `models_dir()/hf/<name>-<content id>`, so the next load is an ordinary
`from_pretrained` of a directory, and the same weights llama.cpp serves are what transformers trains.

With CUDA present Unsloth's `FastLanguageModel` loads the model (imported only then); on CPU, plain transformers.
torch and transformers are imported on first use, so the base install never needs them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.errors import BindingError, MissingDependency

CHUNK = 1 << 22
DTYPES = ("auto", "float32", "bfloat16", "float16")


def supported_architectures() -> list[str]:
    """GGUF `general.architecture` values transformers can load (its GGUF config mapping)."""
    _require()
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def gguf_architecture(gguf: Path) -> str:
    """The `general.architecture` of a GGUF file, read from its header."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field else ""


def gguf_path(target: str) -> Path | None:
    """The GGUF file `target` names (an alias or a .gguf path), or None when it is not one."""
    from app.local_models import ALIASES, resolve_model

    if target in ALIASES or target.endswith(".gguf"):
        return resolve_model(target)
    return None


def plain_checkpoint(gguf: Path | str) -> Path:
    """A plain transformers checkpoint (model + tokenizer) of a GGUF, made once and reused.

    Safe when several processes ask first at once: each writes into a private temp directory and renames it into
    place; a loser of the race throws its copy away and uses the winner's.
    """
    path = gguf_path(str(gguf)) or Path(gguf)
    if not path.is_file():
        raise BindingError(f"GGUF file not found: {path}; give an existing .gguf path or a model alias")
    from app.local_models import models_dir

    name = path.name.removesuffix(".gguf")
    final = models_dir() / "hf" / f"{name}-{content_id(path)}"
    if (final / "config.json").is_file():
        return final
    _require()
    arch = gguf_architecture(path)
    known = supported_architectures()
    if arch not in known and arch.replace("moe", "_moe") not in known:
        raise BindingError(f"{path.name}: GGUF architecture {arch!r} cannot be loaded by transformers; "
                           f"supported architectures: {', '.join(known)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
        strip_quantizer(model)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        (tmp / "slmswap_source.json").write_text(json.dumps({"gguf": str(path), "architecture": arch}))
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first
            if not (final / "config.json").is_file():
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return final


def strip_quantizer(model: Any) -> Any:
    """Remove the GGUF quantizer transformers attaches to a dequantised model (it blocks saving and training)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


@functools.cache
def _content_id(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def content_id(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256 (hashed once per process per file version)."""
    st = path.stat()
    return _content_id(str(path.resolve()), st.st_size, st.st_mtime_ns)


def resolve_dir(target: str) -> Path:
    """The model or adapter directory `target` loads from: a GGUF becomes its plain checkpoint."""
    gguf = gguf_path(target)
    if gguf is not None:
        return plain_checkpoint(gguf)
    path = Path(target).expanduser()
    if not path.is_dir():
        from app.local_models import ALIASES

        raise BindingError(f"{target}: not a model alias, a .gguf file or a model directory; give one of "
                           f"{', '.join(ALIASES)}, a .gguf path, or a transformers model / peft adapter directory")
    return path


def load_base(target: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for an alias, a .gguf path, an HF model directory or a peft adapter directory
    (its base, then the adapter on top). The model is in eval mode; callers that train switch it."""
    _require()
    if dtype not in DTYPES:
        raise BindingError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_dir(target)
    adapter = path if (path / "adapter_config.json").is_file() else None
    if adapter is not None:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise BindingError(f"{adapter}/adapter_config.json names no base_model_name_or_path")
        path = resolve_dir(base)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if use_unsloth(dev):
        model, tokenizer = _load_unsloth(path, torch_dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BindingError(f"device {device!r} asked for, but torch sees no CUDA device; use device = \"cpu\"")
    return device


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, dtype)


def use_unsloth(device: str, *, cuda: bool | None = None, installed: bool | None = None) -> bool:
    """Unsloth is used when the model goes to a CUDA device and the package is installed; never on CPU."""
    if not device.startswith("cuda"):
        return False
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if installed is None:
        installed = importlib.util.find_spec("unsloth") is not None
    return cuda and installed


def _load_unsloth(path: Path, torch_dtype: Any) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # only here: it patches torch/transformers on import and needs CUDA

    return FastLanguageModel.from_pretrained(model_name=str(path), dtype=torch_dtype, load_in_4bit=False)


def _require() -> None:
    for module in ("torch", "transformers", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependency(f"loading models for transformers needs {module}: pip install -e '.[train]'")
