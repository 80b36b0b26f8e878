"""`slmswap export RUN [--merged]`: a trained run as GGUF for llama.cpp (training/export.py does the work).

Registered in app/cli.py; numpy, gguf and llama-cpp-python load only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

out = Console()


def export_command(
    run_dir: Path = typer.Argument(..., help="A run folder written by slmswap train (run.json + adapter/)."),
    merged: bool = typer.Option(False, "--merged", help="Write base + LoRA as one GGUF re-quantised to the base's "
                                                        "types (serving needs no adapter)."),
    target: Path | None = typer.Option(None, "--out", "-o", help="The file to write (default: RUN/adapter.gguf, "
                                                                 "or RUN/merged.gguf with --merged)."),
) -> None:
    """Export a trained run for llama.cpp: its LoRA as a GGUF adapter over the base GGUF (q/k permuted where the
    base's architecture needs it), or merged. Prints the file and the binding that serves it.
    Example: slmswap export runs/r1 && slmswap eval --suite bfcl:simple_python --model "$(binding)" """
    from training.export import export_adapter, export_merged, serving_binding

    written = export_merged(run_dir, target) if merged else export_adapter(run_dir, target)
    out.print(Text(f"wrote {written}"), highlight=False)
    if target is None:  # the default place is the one serving_binding knows
        out.print(Text(f"serve it as: {serving_binding(run_dir, merged=merged)}"), highlight=False)
