#!/usr/bin/env bash
# The test suite on a CUDA machine: every test whose code path picks `--device auto` runs on the GPU there
# (fp16 pipelines, AMP GradScaler, CUDA generators, per-process devices), which the CPU-only CI never sees.
# Usage, from the repository root of a GPU machine (wheels the machine lacks may be put in .whl/):
#   OUT=/tmp/out bash benchmarks/cuda_checks.sh
# Writes $OUT/env.txt, $OUT/pytest.txt and $OUT/junit.xml; prints the pytest summary.
set -u
OUT=${OUT:-/tmp/vlcp-cuda-checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  pip install -q --no-deps --target /tmp/vlcp-site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/vlcp-site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'gpu', torch.cuda.is_available())"
  nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# -p no:cacheprovider: the checkout may be read-only; the browser test skips without Chromium
timeout "${PYTEST_TIMEOUT:-420}" python -m pytest -q -rfE -p no:cacheprovider --durations=10 \
  --junitxml "$OUT/junit.xml" "$@" >"$OUT/pytest.txt" 2>&1
echo "pytest rc $?"
tail -40 "$OUT/pytest.txt"
