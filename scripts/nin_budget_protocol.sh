#!/usr/bin/env bash
# The CPU budget protocol of DESIGN.md section 5, end to end (about 115 min on 2 cores):
# FP32 pre-training of NIN on a fixed class-balanced 10k subset of CIFAR-10 (JPEG), then
# QAT fine-tuning of each variant from that checkpoint, with the FP32 row (quant=none)
# fine-tuned the same way for fairness, then post-training quantization (PTQ) of the
# pre-trained checkpoint with each calibration method, then the report of all of it.
# Every QAT and PTQ row is also exported to ONNX int8 and scored in onnxruntime.
#   bash scripts/nin_budget_protocol.sh [OUT_DIR]     (default outputs/nin_budget)
# Set CIFAR10_FOLDER if the ImageFolder copy is not at ../shared/data/cifar10-jpeg.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/nin_budget}
python=${PYTHON:-.venv/bin/python}
quiet=(callbacks.progress_bar=null trainer.enable_model_summary=false data.num_workers=0)
latest() { ls "$out"/fp32/checkpoints/latest-epoch*.ckpt 2>/dev/null | tail -n 1; }
if [ -z "$(latest)" ]; then
  "$python" train.py recipe=nin_fp32_cpu hydra.run.dir="$out/fp32" "${quiet[@]}"
fi
"$python" train.py -m recipe=nin_qat_cpu init_checkpoint="$(latest)" \
  quant=none,sym_fold,sym_unfold,asym_fold,asym_unfold,sym_fold_int8_input hydra.sweep.dir="$out/qat" "${quiet[@]}" \
  trainer.check_val_every_n_epoch=2 deploy.integer_test_batches=4
"$python" train.py -m recipe=nin_ptq_cpu init_checkpoint="$(latest)" \
  ptq.method=minmax,ema,percentile,kl hydra.sweep.dir="$out/qat/ptq" "${quiet[@]}" \
  deploy.integer_test_batches=4
"$python" -m lightning_qat.report "$out/qat"
