#!/usr/bin/env bash
# The CPU budget protocol of DESIGN.md section 5, end to end, for MODEL = nin | resnet20 |
# vit_tiny (recipes MODEL_fp32_cpu, MODEL_qat_cpu or vit_tiny_qat, MODEL_ptq_cpu): FP32 pre-training on a fixed
# class-balanced 10k subset of CIFAR-10 (JPEG), then QAT fine-tuning of each variant from
# that checkpoint, with the FP32 row (quant=none) fine-tuned the same way for fairness,
# then post-training quantization (PTQ) of the pre-trained checkpoint with each
# calibration method, then the report of all of it. Every QAT and PTQ row is exported to
# the integer-only reference and to ONNX int8, both scored on the full 10k test set.
# (ViT-tiny: no BatchNorm, so the variants are none, sym_fold, asym_fold.)
#   bash scripts/budget_protocol.sh MODEL [OUT_DIR]     (default outputs/MODEL_budget)
# A step whose results exist is skipped, so a stopped run resumes by running it again.
# Set CIFAR10_FOLDER if the ImageFolder copy is not at ../shared/data/cifar10-jpeg.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: budget_protocol.sh nin|resnet20|vit_tiny [OUT_DIR]}
out=${2:-outputs/${model}_budget}
python=${PYTHON:-.venv/bin/python}
quiet=(callbacks.progress_bar=null trainer.enable_model_summary=false data.num_workers=0)
latest() { ls "$out"/fp32/checkpoints/latest-epoch*.ckpt 2>/dev/null | tail -n 1; }
if [ ! -f "$out/fp32/results.json" ]; then
  "$python" train.py recipe="${model}_fp32_cpu" hydra.run.dir="$out/fp32" "${quiet[@]}"
fi
variants=(none sym_fold sym_unfold asym_fold asym_unfold sym_fold_int8_input)
qat_recipe=${model}_qat_cpu
methods=(minmax ema percentile kl)
if [ "$model" = vit_tiny ]; then
  variants=(none sym_fold asym_fold)
  qat_recipe=vit_tiny_qat
  methods=(minmax ema percentile kl mse)
fi
todo=()
for index in "${!variants[@]}"; do
  [ -f "$out/qat/${index}_${variants[$index]}/results.json" ] || todo+=("${variants[$index]}")
done
if [ ${#todo[@]} -eq ${#variants[@]} ]; then
  "$python" train.py -m recipe="$qat_recipe" init_checkpoint="$(latest)" \
    quant="$(IFS=,; echo "${variants[*]}")" hydra.sweep.dir="$out/qat" "${quiet[@]}"
elif [ ${#todo[@]} -gt 0 ]; then
  for variant in "${todo[@]}"; do
    for index in "${!variants[@]}"; do [ "${variants[$index]}" = "$variant" ] && break; done
    "$python" train.py recipe="$qat_recipe" init_checkpoint="$(latest)" quant="$variant" \
      hydra.run.dir="$out/qat/${index}_${variant}" "${quiet[@]}"
  done
fi
if [ ! -f "$out/qat/ptq/$((${#methods[@]} - 1))_sym_fold/results.json" ]; then
  "$python" train.py -m recipe="${model}_ptq_cpu" init_checkpoint="$(latest)" \
    ptq.method="$(IFS=,; echo "${methods[*]}")" hydra.sweep.dir="$out/qat/ptq" "${quiet[@]}"
fi
"$python" -m lightning_qat.report "$out/qat"
