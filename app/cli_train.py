"""`slmswap train`: LoRA fine-tuning of a local base on a dataset folder (training/train.py does the work).

Registered in app/cli.py; torch, transformers and trl load only when the command runs, so `--help` is instant.
Ctrl-C stops at once and exits 130; the last checkpoint stays, and `--resume` continues from it.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)
if not out.is_terminal:
    out.width = 200


def train_command(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="A dataset folder (slmswap dataset build|from-bfcl)."),
    base: str = typer.Option(..., "--base", "-b", help="gguf:<alias|path> (the weights llama.cpp serves) or an HF "
                                                     "model directory."),
    preset: str = typer.Option(..., "--preset", "-p", help="orchestrator (r=32) or subagent (r=16)."),
    run_dir: Path = typer.Option(..., "--out", "-o", help="The run folder: run.json, adapter/, checkpoints/."),
    dpo: Path | None = typer.Option(None, "--dpo", help="Preference pairs (slmswap dataset pairs): DPO after SFT."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after N optimizer steps (wins "
                                                                          "over --epochs)."),
    epochs: float | None = typer.Option(None, "--epochs", min=0.01, help="Passes over the data (default: 1)."),
    lr: float | None = typer.Option(None, "--lr", min=0.0, help="Learning rate (default: the preset's, 2e-4)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed for the adapter's init and the data order."),
    max_length: int | None = typer.Option(None, "--max-length", min=16, help="Tokens per example (default 1024); "
                                                                             "longer ones are left out."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Examples per step (default 4)."),
    save_steps: int = typer.Option(50, "--save-steps", min=1, help="Checkpoint every N steps."),
    dpo_max_steps: int | None = typer.Option(None, "--dpo-max-steps", min=1, help="Stop DPO after N steps."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (cuda uses Unsloth when installed)."),
) -> None:
    """LoRA SFT (and DPO with --dpo) of a local base; the adapter lands in RUN/adapter.

    Example: slmswap train --dataset bfcl-train/ --base gguf:smollm2-135m --preset subagent --out runs/r1 --max-steps 200
    """
    from training.train import DPO_CHECKPOINTS_DIR, TrainOptions, last_checkpoint, train

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"{device!r}; use auto, cpu or cuda", param_hint="--device")
    options = TrainOptions(dataset=dataset, base=base, preset=preset, out=run_dir, dpo=dpo, max_steps=max_steps,
                           epochs=epochs, lr=lr, resume=resume, seed=seed, max_length=max_length,
                           batch_size=batch_size, save_steps=save_steps, dpo_max_steps=dpo_max_steps, device=device)
    try:
        with _Bar() as bar:
            result = train(options, progress=bar.update)
    except KeyboardInterrupt:
        checkpoint = last_checkpoint(run_dir, DPO_CHECKPOINTS_DIR) or last_checkpoint(run_dir)
        where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        err.print(Text(f"interrupted: {where}; continue with the same command and --resume"), highlight=False)
        raise typer.Exit(130) from None
    out.print(_summary(result.metrics, result.run_dir, result.adapter_dir))


class _Bar:
    """A rich progress bar per phase (sft, dpo) with the last loss and tokens/s."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                 TimeElapsedColumn(), console=err, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, event) -> None:
        total = event.max_steps if event.max_steps and event.max_steps > 0 else None
        if event.phase not in self.tasks:
            self.tasks[event.phase] = self.progress.add_task(event.phase, total=total, loss="-", tps="-")
        loss = f"{event.loss:.4f}" if event.loss is not None else "-"
        tps = f"{event.tokens_per_s:.0f}" if event.tokens_per_s else "-"
        self.progress.update(self.tasks[event.phase], completed=event.step, total=total, loss=loss, tps=tps)


def _summary(metrics: dict, run_dir: Path, adapter_dir: Path) -> Table:
    table = Table(title=f"run {run_dir} (adapter: {adapter_dir})")
    table.add_column("metric")
    table.add_column("value")
    rows = {k: v for k, v in metrics.items() if k != "dpo"}
    rows.update({f"dpo {k}": v for k, v in (metrics.get("dpo") or {}).items()})
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(Text(key), Text(shown))
    return table
