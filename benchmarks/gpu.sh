#!/usr/bin/env bash
# The GPU benchmark on one H100/H200 with no network (about 3 minutes). Packages the image lacks travel as
# wheels in .whl/ (fetch them here first with: bash benchmarks/gpu_wheels.sh). Results land in
# benchmarks/results/gpu-<gpu>.{md,json} and, on the device machine, in $OUT (written after every step).
# Then the CUDA variants of the rank tests run (fp16 tensor-core scoring against fp32 references).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, open_clip, fastapi, uvicorn, httptools, pydantic, grape_rewards.server, grape_rewards.scorer
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'open_clip',
      open_clip.__version__, 'fastapi', fastapi.__version__, 'pydantic', pydantic.__version__)" || exit 1
# The fused rank kernel's tests first, natively. If they pass, the benchmark runs as users do (GRAPE_FUSED_RANK=auto:
# the kernel's own check on this GPU, then whichever is faster); if not, on the torch path. It says which ran.
if ! timeout 120 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" tests/test_rank_kernels.py 2>&1 | tail -5
then
    echo "fused rank kernel failed its test: benchmarking the torch path"; export GRAPE_FUSED_RANK=0
fi
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_gpu.py --device cuda "$@"
status=$?
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -x -p no:cacheprovider -o addopts="" tests/test_rank.py \
    tests/test_clip_tokenizer.py 2>&1 | tail -15
# open_clip retrievers on CUDA (fp16 pad-free encoding); the transformers cases need the MiniLM wheel's tokenizer,
# too large to carry
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_retrievers.py \
    -k "open_clip and cuda" 2>&1 | tail -15
exit $status
