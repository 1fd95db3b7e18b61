#!/usr/bin/env bash
# The GPU checks behind README "On a GPU": tests/test_cuda.py and the other CUDA-only
# tests, the default job (`python train.py`, digits) on the GPU, and the training-step
# bench on the GPU. Run from the repository root on a machine with a CUDA device whose
# python3 has torch, Lightning, torchmetrics, onnx, onnxruntime and scikit-learn; wheels
# in .whl/ (Hydra, say) are installed first. Logs go to $OUT (default gpu_check/).
set -u
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl && export PYTHONPATH=/tmp/gpu_check_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import torch, lightning, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'onnxruntime', o.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"
# TESTS: the tests to run (default: every CUDA-only one); APP=0 skips the default job
TESTS=${TESTS:-tests/test_cuda.py tests/test_nonfinite.py::test_on_a_gpu_the_guard_defers_and_skips_alike tests/test_scripts.py::test_qat_overhead_bench_runs_on_a_gpu}
# shellcheck disable=SC2086
timeout "${TEST_SECONDS:-300}" python3 -m pytest -q -p no:cacheprovider -rA $TESTS 2>&1 \
  | tee "$OUT/tests.log" | grep -E "^(PASSED|FAILED|ERROR|E  )|passed|failed" | head -60
# where a training step on the GPU parts from the CPU's, module by module
timeout 150 python3 scripts/device_agreement.py cuda 2>&1 | grep -v Warn | tee "$OUT/agreement.log"
if [ "${APP:-1}" = 1 ]; then
  timeout 90 python3 train.py hydra.run.dir=/tmp/gpu_check_run 2>&1 | tee "$OUT/run.log" | tail -12
fi
for batch in ${BENCH_BATCHES:-128 1024}; do
  timeout "${BENCH_SECONDS:-90}" python3 bench/qat_overhead.py --device cuda --passes 1 \
    --rounds 40 --warmup 10 --malloc current --batch-size "$batch" \
    --variants "ours sym folded,ours LSQ W4A4" 2>&1 | tee "$OUT/bench$batch.log" | grep "|"
done
