#!/usr/bin/env bash
# Run HERE (where pip reaches the registry), before a GPU session: the wheels a bare GPU machine lacks, or has at
# other versions than constraints.txt, into .whl/ (git ignores it; the device tool's `carry` takes it along).
# The lent H200 image (its package list: /work/.library/device/KINDS.md) has torch 2.11, transformers 5.17,
# huggingface_hub 1.33, tokenizers 0.23.2, peft, accelerate; no diffusers, diskcache or click-option-group.
# torch itself (~900 MB) cannot travel: the GPU figures are torch 2.11's, and benchmarks say so.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
pin() { grep -i "^$1==" constraints.txt; }
for name in transformers diffusers diskcache click-option-group importlib_metadata; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$(pin "$name")" 2>&1 | grep -v "is ignored" || true
done
ls .whl
du -sh .whl
