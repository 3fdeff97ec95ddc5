#!/usr/bin/env bash
# The GPU benchmark on one H100/H200 with no network (under 8 minutes). Packages the image lacks travel as
# wheels in .whl/ (fetch them here first with: bash benchmarks/gpu_wheels.sh); results land in
# benchmarks/results/ and, on the device machine, in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/bench_gpu.py --device cuda "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu-* "$OUT/"; fi
