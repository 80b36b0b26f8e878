#!/usr/bin/env bash
# Issue 10 §8: does fine-tuning SmolLM2-135M on BFCL's ground truth beat the base model, served the same way?
#
#   bench/finetune_bfcl.sh                         # the measurement: about 25 minutes of training on 2 CPU cores
#   EPOCHS=2 bench/finetune_bfcl.sh                # a longer schedule
#   MAX_STEPS=2 ITEMS=0-7 EVAL_LIMIT=4 bench/finetune_bfcl.sh   # a smoke run (a few minutes)
#
# 1. slmswap dataset from-bfcl: simple_python items $ITEMS (never the held-out 300-399) as openai rows
# 2. slmswap train: gguf:smollm2-135m, sub-agent preset (r=16, alpha=32), $EPOCHS epochs or $MAX_STEPS steps
# 3. slmswap export: the LoRA as a GGUF adapter over the base GGUF (gguf:<base>?lora=RUN/adapter.gguf)
# 4. slmswap eval on items 300-399 ($EVAL_OFFSET, $EVAL_LIMIT), base vs fine-tuned, both served by llama.cpp from
#    GGUF, constrained and free decoding; each report (exact %, valid %, arg F1 with 95% intervals) is printed.
# The bar (Issue 10): fine-tuned exact >= base exact + 10 points (constrained); free-decoding validity >= 80%.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${WORK:-$ROOT/.slmswap/bench/finetune_bfcl}
ITEMS=${ITEMS:-0-299}
EPOCHS=${EPOCHS:-1}
MAX_STEPS=${MAX_STEPS:-}  # set: wins over EPOCHS
PRESET=${PRESET:-subagent}
LR=${LR:-2e-4}
BATCH=${BATCH:-4}
MAX_LENGTH=${MAX_LENGTH:-1024}
EVAL_OFFSET=${EVAL_OFFSET:-300}
EVAL_LIMIT=${EVAL_LIMIT:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

slmswap() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'import sys; sys.argv[0] = "slmswap"; from app.cli import main; main()' "$@"; }

rm -rf "$WORK"  # each measurement starts from nothing: a stale run would be resumed or refused
mkdir -p "$WORK"
steps=(--epochs "$EPOCHS")
[[ -n "$MAX_STEPS" ]] && steps=(--max-steps "$MAX_STEPS")

echo "== 1. dataset: bfcl simple_python items $ITEMS"
slmswap dataset from-bfcl --category simple_python --items "$ITEMS" --format openai --out "$WORK/ds"

echo "== 2. train: gguf:smollm2-135m, preset $PRESET, ${steps[*]}"
start=$(date +%s)
slmswap train --dataset "$WORK/ds" --base gguf:smollm2-135m --preset "$PRESET" --out "$WORK/run" "${steps[@]}" \
  --lr "$LR" --batch-size "$BATCH" --max-length "$MAX_LENGTH" --save-steps 25
echo "trained in $(( $(date +%s) - start )) s"

echo "== 3. export"
slmswap export "$WORK/run"
tuned=$(PYTHONPATH="$ROOT" "$PY" -c 'import sys; from pathlib import Path; from training.export import serving_binding; print(serving_binding(Path(sys.argv[1])))' "$WORK/run")
echo "fine-tuned binding: $tuned"

for decoding in constrained free; do
  echo "== 4. eval ($decoding): items $EVAL_OFFSET.. (limit $EVAL_LIMIT), base vs fine-tuned"
  slmswap eval --suite bfcl:simple_python --model gguf:smollm2-135m --model "$tuned" --offset "$EVAL_OFFSET" \
    --limit "$EVAL_LIMIT" --decoding "$decoding" --out "$WORK/eval-$decoding"
  cat "$WORK/eval-$decoding/report.md"
done
echo "== run metrics"
"$PY" -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["metrics"], indent=2))' "$WORK/run/run.json"
