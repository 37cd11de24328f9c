#!/usr/bin/env bash
# Issue 25's GPU measurements in one device call (at most 140 + 200 + 170 s, plus 10 s a step to stop), first things first:
#   here:  bash benchmarks/device_wheels.sh
#   then:  the device tool's run(command="OUT=$OUT bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
#   and, if device time is left: ... "OUT=$OUT bash benchmarks/gpu_session.sh compiled" (the compiled UNet rows)
# Each step has its own time limit, so a slow one cannot starve the next; every step writes what it measured
# to $OUT as it goes (a time limit keeps it: real_shapes.py writes its JSON after every section and on SIGTERM).
# Files back (the tool returns 8 at most): env.txt pytest.txt captions.{txt,json} sd.{txt,json} estimate.txt
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vlcp-gpu-session}
mkdir -p "$OUT"
. benchmarks/device_env.sh || exit 1
RS="python3 benchmarks/real_shapes.py --compare"
if [ "${1:-}" = compiled ]; then  # the second call: fine-tuning and img2img with inductor (compiles for minutes)
  timeout -k 10 540 $RS --stages finetune,synthesis --json "$OUT/compiled.json" 2>&1 | tee "$OUT/compiled.txt"
  exit 0
fi
# 1. the CUDA tests: are the fast paths' outputs the plain paths' in fp16 on the GPU?
PYTEST_TIMEOUT=140 TEST_TIMEOUT=110 OUT=$OUT bash benchmarks/cuda_checks.sh
# 2. captions: batch 32 hf (old) vs batch from memory, hf and hf-static; reference one per call vs batched
timeout -k 10 200 $RS --stages captions --json "$OUT/captions.json" 2>&1 | tee "$OUT/captions.txt"
# 3. the VAE, fine-tuning (old 8 x 4 checkpointed vs the plan from memory), img2img, the detector
timeout -k 10 170 $RS --skip-compiled --stages latents,finetune,synthesis,detector --json "$OUT/sd.json" 2>&1 \
  | tee "$OUT/sd.txt"
# 4. `vlcp distill` hours for ImageNette and ImageNet-1K on 1 and 8 GPUs, from both parts' rates
python3 benchmarks/real_shapes.py --estimate "$OUT/captions.json" "$OUT/sd.json" 2>&1 | tee "$OUT/estimate.txt"
