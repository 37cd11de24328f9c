# Sourced by cuda_checks.sh and gpu_session.sh on the GPU machine: the carried wheels (.whl/, from
# benchmarks/device_wheels.sh) installed beside the image's own packages, this checkout on the path, unbuffered
# output (a time limit must not swallow what was printed).
export PYTHONUNBUFFERED=1
if [ -n "${VLCP_DEVICE_ENV:-}" ]; then  # sourced once already (gpu_session.sh, then cuda_checks.sh)
  :
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlcp-site \
    .whl/*.whl || { echo "device_env: the wheels in .whl/ did not install" >&2; return 1; }
  export PYTHONPATH=/tmp/vlcp-site:$PWD
else
  echo "device_env: no .whl/ (run benchmarks/device_wheels.sh here and carry .whl): diffusers may be missing" >&2
  export PYTHONPATH=$PWD
fi
export VLCP_DEVICE_ENV=1
