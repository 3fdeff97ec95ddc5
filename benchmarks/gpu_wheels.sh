#!/usr/bin/env bash
# Download (here, with PyPI) the wheels that the GPU machine's image lacks, for Python 3.12 / x86-64, into .whl/.
# The image has torch, torchvision, transformers, safetensors, tqdm, pyyaml, numpy, httpx and prometheus-client.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth pydantic==2.14.3 pydantic-core annotated-types \
    typing-inspection fastapi starlette annotated-doc uvicorn h11 orjson
ls -la .whl
