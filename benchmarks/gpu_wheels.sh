#!/usr/bin/env bash
# Download (here, with PyPI) the wheels that the GPU machine's image lacks, for Python 3.12 / x86-64, into .whl/.
# The image has torch, torchvision, transformers, safetensors, timm, regex, tqdm, pyyaml, numpy, httpx, anyio,
# click, uvloop and prometheus-client; everything else the service needs travels, pinned to what CI installs.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 fastapi==0.165.0 starlette==1.10.0 \
    annotated-doc==0.0.7 opentelemetry-api==1.45.2 uvicorn==0.54.0 h11==0.16.0 httptools==0.9.0 orjson py-spy==0.4.3
ls -la .whl
du -sh .whl
