"""Export a trained run for llama.cpp: its peft LoRA as a GGUF adapter over the base GGUF, or merged into the base
and re-quantised to the base's types, so the model that was trained is the one llama.cpp serves.

A run is what `slmswap train` writes: `RUN/run.json` (`base`, `base_gguf`, `adapter`, ...) and the peft adapter
in `RUN/adapter/` (`adapter_config.json` + `adapter_model.safetensors`). Only numpy, safetensors, the `gguf`
package and (for `--merged`) llama-cpp-python's quantizer are used: no model is loaded to export.

The trap, and why the q/k B matrices are permuted
-------------------------------------------------
transformers applies rotary embeddings to the two halves of each head (`rotate_half`), while llama.cpp's llama
architecture rotates adjacent pairs of each head (the "normal", non-NeoX rope). So when a Llama checkpoint is
converted to GGUF, llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) reorders the output rows of
`q_proj` (per attention head) and `k_proj` (per KV head): inside each head, row `i` of the first half and row `i`
of the second half become neighbours. Loading such a GGUF into transformers undoes the permutation, so a LoRA
trained there lives in the *unpermuted* row order. Its delta `B @ A` has the output rows of the base weight, so
its B (out x r) must get the same row permutation before llama.cpp adds it to a permuted weight; A (r x in)
acts on the input side and stays as it is. Without it the adapter still loads and still changes the logits, just
into noise for q/k (measured: the logit change correlates 0.27 with peft's instead of 0.98). Which architectures
were permuted is a property of the converter, so it is decided per `general.architecture` of the base GGUF
(`PERMUTED_QK`): llama yes; qwen2, qwen3 and gemma3 no (their GGUF rope is NeoX-style, like transformers').
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from app.errors import MissingDependency, UsageError

# general.architecture -> whether the converter permuted attn_q/attn_k rows for rope (see the module docstring).
PERMUTED_QK: dict[str, bool] = {"llama": True, "qwen2": False, "qwen3": False, "gemma3": False}

# peft's module names (the Llama/Qwen/Gemma layout transformers uses) that a GGUF adapter can carry.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ADAPTER_FILE = "adapter.gguf"
MERGED_FILE = "merged.gguf"


@dataclass(frozen=True)
class Run:
    """A training run folder, read from its run.json."""

    dir: Path
    base: str  # the binding it was trained on, e.g. gguf:smollm2-135m
    base_gguf: Path
    adapter_dir: Path


@dataclass(frozen=True)
class BaseGGUF:
    """What export needs to know about the base GGUF file."""

    path: Path
    arch: str
    n_head: int
    n_head_kv: int
    n_blocks: int
    file_type: int | None  # general.file_type (a llama_ftype); None when the file does not say


@dataclass(frozen=True)
class LoraTensor:
    """One adapted weight in GGUF terms: `name` is the base tensor (`blk.0.attn_q.weight`), `a` is (r, in) and `b`
    is (out, r) in the GGUF's row order, scaled so that llama.cpp's `alpha / r` (`scale`) gives peft's scaling:
    the weight llama.cpp computes with is `W + scale * b @ a`."""

    name: str
    a: Any  # np.ndarray float32
    b: Any
    scale: float


# ---- public API ------------------------------------------------------------------------------------------------

def export_adapter(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's LoRA as a GGUF adapter for llama.cpp (default `RUN/adapter.gguf`) and return its path.

    >>> export_adapter(Path("runs/r1"))          # then serve it: serving_binding(Path("runs/r1"))
    PosixPath('runs/r1/adapter.gguf')
    """
    run = load_run(run_dir)
    target = Path(out) if out else run.dir / ADAPTER_FILE
    base = read_base(run.base_gguf)
    config, tensors = read_adapter(run.adapter_dir)
    write_adapter_gguf(lora_tensors(config, tensors, base), base, float(config["lora_alpha"]), target)
    return target


def export_merged(run_dir: Path, out: Path | None = None) -> Path:
    """Write base + LoRA as one GGUF re-quantised to the base's tensor types (default `RUN/merged.gguf`), so
    serving needs no adapter; return its path.

    >>> export_merged(Path("runs/r1"))            # serve it as gguf:runs/r1/merged.gguf
    PosixPath('runs/r1/merged.gguf')
    """
    run = load_run(run_dir)
    target = Path(out) if out else run.dir / MERGED_FILE
    base = read_base(run.base_gguf)
    config, tensors = read_adapter(run.adapter_dir)
    write_merged_gguf(lora_tensors(config, tensors, base), base, target)
    return target


def serving_binding(run_dir: Path, merged: bool = False) -> str:
    """The binding that serves the exported run: `gguf:<base>?lora=<RUN/adapter.gguf>`, or with `merged`,
    `gguf:<RUN/merged.gguf>`. Paths are absolute; export first (export_adapter / export_merged).

    >>> serving_binding(Path("runs/r1"))
    'gguf:/abs/SmolLM2-135M-Instruct.Q4_1.gguf?lora=/abs/runs/r1/adapter.gguf'
    """
    run = load_run(run_dir)
    file = (run.dir / (MERGED_FILE if merged else ADAPTER_FILE)).resolve()
    if not file.is_file():
        how = "slmswap export RUN --merged" if merged else "slmswap export RUN"
        raise UsageError(f"{file} does not exist; export the run first: {how.replace('RUN', str(run.dir))}")
    if merged:
        return f"gguf:{_binding_path(file)}"
    return f"gguf:{_binding_path(run.base_gguf.resolve())}?lora={_binding_path(file)}"


def _binding_path(path: Path) -> str:
    # A binding's options are a query string (parse_qsl): '?', '&', '%', '+' or '#' in a path must be escaped.
    return quote(str(path), safe="/:.-_~ ")


# ---- reading the run, the base and the adapter -----------------------------------------------------------------

def load_run(run_dir: Path) -> Run:
    """The run in `run_dir`; UsageError when it is not a run or holds no adapter."""
    run_dir = Path(run_dir)
    meta_file = run_dir / "run.json"
    if not meta_file.is_file():
        raise UsageError(f"{run_dir} is not a training run (no run.json); give the --out folder of slmswap train")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{meta_file} is not valid JSON ({exc}); it is written by slmswap train") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_file} does not hold a JSON object; it is written by slmswap train")
    adapter_dir = run_dir / str(meta.get("adapter") or "adapter")
    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise UsageError(f"run {run_dir} has no adapter ({adapter_dir} lacks adapter_config.json or "
                         "adapter_model.safetensors); train it first, or resume it: slmswap train ... --resume")
    base = str(meta.get("base") or "")
    return Run(run_dir, base, _base_gguf(meta, base, run_dir), adapter_dir)


def _base_gguf(meta: dict[str, Any], base: str, run_dir: Path) -> Path:
    from app.local_models import resolve_model

    if meta.get("base_gguf"):
        path = Path(str(meta["base_gguf"])).expanduser()
        if not path.is_file():
            raise MissingDependency(f"the base GGUF of run {run_dir}, {path}, does not exist; restore it (export "
                                    "needs the exact file the run was trained on)")
        return path
    if base.startswith("gguf:"):
        from app.bindings import parse_binding

        return resolve_model(parse_binding(base).target)
    raise UsageError(f"run {run_dir} was trained on {base or 'an unknown base'}, which is not a GGUF; export needs "
                     "the base as GGUF (train on gguf:<alias|path>, or convert the base with llama.cpp's "
                     "convert_hf_to_gguf.py and set base_gguf in run.json)")


def read_base(path: Path) -> BaseGGUF:
    """The base GGUF's architecture and attention shape; UsageError for an architecture export does not know."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in PERMUTED_QK:
        raise UsageError(f"{path} is a {arch!r} GGUF; export supports the architectures "
                         f"{', '.join(sorted(PERMUTED_QK))}")
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    return BaseGGUF(path=path, arch=arch, n_head=n_head,
                    n_head_kv=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
                    n_blocks=int(_field(reader, f"{arch}.block_count")),
                    file_type=_field(reader, "general.file_type", None))


def _field(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise UsageError(f"{reader.path} has no {key!r} metadata; is it a llama.cpp model GGUF?")
        return default
    return field.contents()


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config, {tensor name: float32 array}); UsageError for an adapter kind a GGUF LoRA cannot carry."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = [why for key, why in (
        ("use_dora", "DoRA (use_dora)"), ("modules_to_save", "fully trained modules (modules_to_save)"),
        ("alpha_pattern", "per-module alpha (alpha_pattern)"), ("fan_in_fan_out", "fan_in_fan_out")) if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"trained biases (bias={config['bias']!r})")
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type {config['peft_type']!r}")
    if unsupported:
        raise UsageError(f"the adapter in {adapter_dir} uses {', '.join(unsupported)}, which a GGUF LoRA adapter "
                         "cannot carry; train a plain LoRA (the orchestrator and subagent presets are)")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise MissingDependency("export needs the train extra: pip install -e '.[train]'") from None
    tensors = {k: v.float().numpy() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    return config, tensors


# ---- peft tensors -> GGUF LoRA tensors -----------------------------------------------------------------------

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def lora_tensors(config: dict[str, Any], tensors: dict[str, Any], base: BaseGGUF,
                 permute_qk: bool | None = None) -> list[LoraTensor]:
    """peft's lora_A/lora_B pairs as GGUF LoRA tensors for `base`: names mapped to the GGUF's, B scaled so that
    llama.cpp's `lora_alpha / r` equals peft's scaling, and q/k B permuted where the base's converter permuted
    q/k (`permute_qk` overrides that, for the test that proves the permutation matters)."""
    gguf = _gguf()
    permute = PERMUTED_QK[base.arch] if permute_qk is None else permute_qk
    names = gguf.get_tensor_name_map(_model_arch(base.arch), base.n_blocks)
    alpha = float(config["lora_alpha"])
    out = []
    for module, (a, b) in sorted(_pairs(tensors).items()):
        name = names.get_name(_hf_name(module), try_suffixes=(".weight",))
        if name is None or not _adaptable(module):
            raise UsageError(f"the adapter trains {module}, which a GGUF LoRA adapter for {base.arch} cannot "
                             f"carry; train only the projections {', '.join(LORA_MODULES)}")
        rank = a.shape[0]
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        b = b * (scaling / (alpha / rank))  # 1.0 for plain LoRA; rsLoRA folds its sqrt(r) into B
        if permute and name.endswith(("attn_q", "attn_k")):
            b = permute_rows(b, base.n_head if name.endswith("attn_q") else base.n_head_kv)
        out.append(LoraTensor(f"{name}.weight", a.astype("float32"), b.astype("float32"), alpha / rank))
    return out


def permute_rows(w: Any, n_head: int) -> Any:
    """The row order llama.cpp's converter gives a Llama q/k projection (convert_hf_to_gguf.py LlamaModel.permute):
    per head, the two rotary halves are interleaved. Works on any matrix whose rows are the projection's outputs."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pairs(tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise UsageError(f"the adapter holds {key!r}, which is not a LoRA A or B matrix; a GGUF LoRA adapter "
                             "carries only those (was the adapter trained with modules_to_save or new tokens?)")
        found.setdefault(match["module"], {})[match["ab"]] = value
    missing = [m for m, ab in found.items() if set(ab) != {"A", "B"}]
    if missing:
        raise UsageError(f"the adapter's {missing[0]} has only one of lora_A/lora_B; the adapter file is damaged")
    return {m: (ab["A"], ab["B"]) for m, ab in found.items()}


def _hf_name(module: str) -> str:
    # Multimodal wrappers (Gemma3ForConditionalGeneration) put the text model under language_model.
    return module.replace("model.language_model.", "model.", 1).replace("language_model.", "", 1)


def _adaptable(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in LORA_MODULES


def _model_arch(arch: str) -> Any:
    gguf = _gguf()
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


# ---- writing -------------------------------------------------------------------------------------------------

def write_adapter_gguf(tensors: list[LoraTensor], base: BaseGGUF, alpha: float, out: Path) -> None:
    """A GGUF LoRA adapter as llama.cpp's convert_lora_to_gguf.py writes it: general.type=adapter,
    adapter.type=lora, adapter.lora.alpha, and F32 `<base tensor>.lora_a` (r x in) / `.lora_b` (out x r)."""
    gguf = _gguf()
    _check_shapes(tensors, base)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for t in tensors:
            writer.add_tensor(f"{t.name}.lora_a", t.a)  # numpy shape is GGUF's ne reversed: ne = [in, r]
            writer.add_tensor(f"{t.name}.lora_b", t.b)  # ne = [r, out]
        _finish(writer)

    _atomic(out, write)


def write_merged_gguf(tensors: list[LoraTensor], base: BaseGGUF, out: Path) -> None:
    """Base + `scaling * B @ A` in one GGUF whose tensors have the base's types.

    The adapted weights are dequantised (gguf.quants), summed in float32 and written to an intermediate F32 file
    beside every other tensor copied byte for byte; llama.cpp's quantizer then brings them back to the base's type,
    tensor by tensor (overrides pin each one to the type it had, so its mixture rules change nothing else).
    """
    gguf = _gguf()
    _check_shapes(tensors, base)
    reader = gguf.GGUFReader(base.path)
    deltas = {t.name: t.scale * (t.b @ t.a) for t in tensors}
    types = {t.name: t.tensor_type for t in reader.tensors}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merge-") as tmp:
        staged = Path(tmp) / "f32.gguf"
        writer = gguf.GGUFWriter(staged, base.arch)
        _copy_metadata(reader, writer)
        for t in reader.tensors:
            if t.name in deltas:
                weight = gguf.quants.dequantize(t.data, t.tensor_type).astype("float32") + deltas[t.name]
                writer.add_tensor(t.name, weight)
            else:
                writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        _finish(writer)
        rows = {name: int(delta.shape[1]) for name, delta in deltas.items()}
        _atomic(out, lambda target: quantize(staged, target, base, types, rows))


def quantize(src: Path, out: Path, base: BaseGGUF, tensor_types: dict[str, Any], adapted: dict[str, int]) -> None:
    """llama.cpp's quantizer (llama_model_quantize) from `src` to the base's file type, every tensor pinned to its
    type in `tensor_types` (those already in it are copied as they are).

    The `adapted` tensors (name -> row length) get a uniform importance matrix. That changes no type; it makes
    llama.cpp search each block's scale and minimum for the least squared error instead of taking the block's
    min/max, which for Q4_1 cuts the rounding error on the merged weights by about a third: rounding is the one
    thing that separates the merged file from base + LoRA, and a fine-tuning delta is small next to a 4-bit step.
    """
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise MissingDependency("--merged needs llama-cpp-python: make install") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = base.file_type if base.file_type is not None else llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = False  # nothing already quantized may change: the overrides keep every type
    params.nthread = max(1, min(os.cpu_count() or 1, 8))
    keep: list[Any] = []  # every buffer the C call reads stays alive until it returns
    overrides = _c_array(llama_cpp.llama_model_tensor_override, [
        (f"^{re.escape(name)}$".encode(), int(qtype)) for name, qtype in tensor_types.items()],
        (None, llama_cpp.GGML_TYPE_COUNT))
    rows = {name: (ctypes.c_float * n)(*([1.0] * n)) for name, n in adapted.items()}
    imatrix = _c_array(llama_cpp.llama_model_imatrix_data, [
        (name.encode(), ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), len(row)) for name, row in rows.items()],
        (None, None, 0))
    keep += [overrides, rows, imatrix]
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    params.imatrix = ctypes.cast(imatrix, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise UsageError(f"llama.cpp could not quantize the merged model to the types of {base.path} "
                         f"(file type {base.file_type}); export the adapter instead: slmswap export RUN")
    del keep


def _c_array(struct: Any, items: list[tuple[Any, ...]], terminator: tuple[Any, ...]) -> Any:
    """A C array of `struct` filled from tuples (in field order), ended by `terminator`, as llama.h expects."""
    array = (struct * (len(items) + 1))()
    for slot, values in zip(array, [*items, terminator]):
        for (field, _), value in zip(struct._fields_, values):
            setattr(slot, field, value)
    return array


def _check_shapes(tensors: list[LoraTensor], base: BaseGGUF) -> None:
    gguf = _gguf()
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in gguf.GGUFReader(base.path).tensors}
    for t in tensors:
        want = shapes.get(t.name)
        got = (t.b.shape[0], t.a.shape[1])
        if want != got:
            raise UsageError(f"the adapter's {t.name} is {got[0]}x{got[1]} but the base {base.path} has "
                             f"{'no such tensor' if want is None else f'{want[0]}x{want[1]}'}; was the run "
                             "trained on another base?")


def _copy_metadata(reader: Any, writer: Any) -> None:
    gguf = _gguf()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _atomic(out: Path, write: Any) -> None:
    # Written beside the target and renamed into place: a crash never leaves a half file where a server looks.
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependency("export needs the gguf package (in the train extra): pip install -e '.[train]'") from None
    return gguf
