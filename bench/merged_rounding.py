"""How much of a LoRA's weight change survives `slmswap export --merged` re-quantising to the base's Q4_1.

For a few adapted tensors of the base: the median Q4_1 grid step, the delta's std, and the share of the delta
the re-quantised weight keeps, <Q(W+d) - W, d> / |d|^2 (1 = all of it, 0 = the base), for the test probe's random
B (std 0.05, 0.3, 1.0) and for the trained adapter of RUN (and it scaled x10, x50). Uses gguf.quants' Q4_1 (llama.cpp's
reference rounding); no model is loaded.

    PYTHONPATH=. python bench/merged_rounding.py RUN
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from training import export

NAMES = ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.15.ffn_down.weight", "blk.15.ffn_up.weight")


def kept(w: np.ndarray, delta: np.ndarray, qtype) -> tuple[float, float, float]:
    step = float(np.median(np.ptp(w.reshape(-1, 32), axis=1) / 15))
    carried = gguf.quants.dequantize(gguf.quants.quantize(w + delta, qtype), qtype) - w
    return step, float(delta.std()), float((carried * delta).sum() / (delta * delta).sum())


def main(run_dir: Path) -> None:
    run = export.load_run(run_dir)
    base = export.read_base(run.base_gguf)
    tensors = {t.name: t for t in gguf.GGUFReader(run.base_gguf).tensors}
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    raw = {k: v.astype(np.float32) for k, v in load_file(str(run.adapter_dir / "adapter_model.safetensors")).items()}
    trained = {t.name: t for t in export.lora_tensors(config, raw, base)}
    rng = np.random.default_rng(0)
    for name in NAMES:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        rows, cols = w.shape
        a = rng.uniform(-1 / np.sqrt(cols), 1 / np.sqrt(cols), (8, cols)).astype(np.float32)  # peft's A init
        cases = {f"probe B std {s}": 2 * (rng.normal(0, s, (rows, 8)).astype(np.float32) @ a) for s in (0.05, 0.3, 1.0)}
        d = trained[name].scale * (trained[name].b @ trained[name].a)
        cases.update({f"trained x{k}": k * d for k in (1, 10, 50)})
        for label, delta in cases.items():
            step, std, share = kept(w, delta, t.tensor_type)
            print(f"{name:24s} {label:18s} step {step:.4f}  delta std {std:.6f}  kept {share:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
