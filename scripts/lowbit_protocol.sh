#!/usr/bin/env bash
# The ResNet-20 low-bit protocol of issue 12 (DESIGN.md section 7), end to end: FP32
# pre-training on the fixed 10k CIFAR-10 subset (shared with budget_protocol.sh resnet20),
# then, from that checkpoint, with one budget for every row (recipe resnet20_lowbit_cpu):
# the fair FP32 row, LSQ and observer-based QAT at W8A8, W4A8, W4A4, W3A3, W2A2 (first and
# last layers at 8 bits; the *_res8 rows keep the residual adds at 8 bits, *_full rows use
# LSQ's full signed weight grid, *_kd rows distil from the FP32 checkpoint, *_undamped rows
# learn 8-bit steps with LSQ's gradient as published), and PTQ at each
# width (recipe resnet20_lowbit_ptq_cpu, mse ranges); every quantized row exported and
# scored on the full 10k test set; the report.
#   bash scripts/lowbit_protocol.sh [OUT_DIR] [ROW ...]   (default outputs/resnet20_budget)
# ROWs (default: all, most telling first): none, w4a4_lsq, ptq_w4a4 ...; a row ending in
# _kd distils from the FP32 checkpoint (module.distillation_weight=0.5, temperature 1:
# labels and teacher weighted equally); a row ending in _lowwd (before any _kd) trains with
# a quarter of the recipe's weight decay (1.25e-4: LSQ trains lower precisions with less
# weight decay, Esser et al. 2019 section 3; README, "ResNet-20 at 8 to 2 bits"); a row
# ending in _wdamp (before any _lowwd and _kd) damps the weight steps' gradients above 4
# bits only (quant.high_bits_damping=weights): w4a4_lsq_res8_wdamp_kd is the W4A4 setting
# the README runs on every FP32 base; a row whose results.json exists is skipped, so a
# stopped run resumes by running it again. SEED=N (default: the recipe's seed) trains
# every row with seed=N into ROW_seedN (the FP32 checkpoint stays the one of the default
# seed); the report groups the repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/resnet20_budget}
shift || true
python=${PYTHON:-.venv/bin/python}
quiet=(callbacks.progress_bar=null trainer.enable_model_summary=false data.num_workers=0)
suffix=""
if [ -n "${SEED:-}" ]; then
  suffix="_seed$SEED"
fi
if [ ! -f "$out/fp32/results.json" ]; then
  "$python" train.py recipe=resnet20_fp32_cpu hydra.run.dir="$out/fp32" "${quiet[@]}"
fi
checkpoint=$(ls "$out"/fp32/checkpoints/latest-epoch*.ckpt | tail -n 1)
rows=("$@")
if [ ${#rows[@]} -eq 0 ]; then
  rows=(none w4a4_lsq_res8_wdamp_kd w4a4_lsq_res8 w2a2_lsq_res8_full_kd w2a2_lsq_res8_full w2a2_lsq_res8 w4a4_lsq_res8_undamped w4a4_lsq
        w2a2_lsq w2a2 ptq_w4a4 ptq_w2a2 w4a4
        w3a3_lsq w3a3 ptq_w3a3 w4a8_lsq w4a8 ptq_w4a8 w8a8_lsq w8a8 ptq_w8a8)
fi
for row in "${rows[@]}"; do
  dir="$out/lowbit/$row$suffix"
  [ -f "$dir/results.json" ] && continue
  settings=("${quiet[@]}" ${SEED:+seed=$SEED})
  quant=$row
  if [[ $quant == *_kd ]]; then
    settings+=(module.distillation_weight=0.5 module.distillation_temperature=1)
    quant=${quant%_kd}
  fi
  if [[ $quant == *_lowwd ]]; then
    settings+=(optimizer.weight_decay=1.25e-4)
    quant=${quant%_lowwd}
  fi
  if [[ $quant == *_wdamp ]]; then
    settings+=(quant.high_bits_damping=weights)
    quant=${quant%_wdamp}
  fi
  if [[ $quant == ptq_* ]]; then
    "$python" train.py recipe=resnet20_lowbit_ptq_cpu init_checkpoint="$checkpoint" \
      quant="${quant#ptq_}" hydra.run.dir="$dir" "${settings[@]}"
  else
    "$python" train.py recipe=resnet20_lowbit_cpu init_checkpoint="$checkpoint" \
      quant="$quant" hydra.run.dir="$dir" "${settings[@]}"
  fi
done
"$python" -m lightning_qat.report "$out/lowbit"
