#!/usr/bin/env bash
# The CUDA tests on a GPU machine: the four questions of tests/test_throughput.py (hf-static's tokens, batched
# reference captions, the img2img memory fit, the fine-tuning plan), each its own test, and the fine-tuning
# plan's tests; with arguments, those pytest arguments instead (e.g. `tests/ -n 8` for the whole suite, where
# every test whose path picks `--device auto` runs on the GPU).
# Usage, from the repository root of a GPU machine (with .whl/ from benchmarks/device_wheels.sh):
#   OUT=/tmp/out bash benchmarks/cuda_checks.sh [pytest arguments]
# Writes $OUT/env.txt and $OUT/pytest.txt; prints them as it goes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vlcp-cuda-checks}
mkdir -p "$OUT"
. benchmarks/device_env.sh || exit 1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'gpu', torch.cuda.is_available())"
  nproc
} 2>&1 | tee "$OUT/env.txt"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/test_throughput.py tests/test_micro_batch.py)
# a test that hangs fails alone (pytest-timeout is on the image), and `timeout` ends the whole run in time
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "${TEST_TIMEOUT:-240}")
# -p no:cacheprovider: the checkout may be read-only; the browser test skips without Chromium
set -o pipefail
timeout -k 10 "${PYTEST_TIMEOUT:-300}" python3 -m pytest -q -rfEs -p no:cacheprovider --durations=10 "${per_test[@]}" \
  "${args[@]}" 2>&1 | tee "$OUT/pytest.txt"
echo "pytest rc $?"
