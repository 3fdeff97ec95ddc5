"""Shared pieces of the benchmarks: machine description, matmul peak, text-tower FLOPs, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor name where that is not readable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and versions a result was measured on. ``cpu_capability`` is the instruction set torch's CPU
    kernels dispatch to (AVX2, AVX512, ...): float32 results can round differently from one to another."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import open_clip
        import transformers

        info["open_clip"] = open_clip.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                      seconds: float = 1.0) -> float:
    """Measured dense matrix-multiply FLOP/s of this machine (the roofline's roof), in the same run."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def text_tower_flops(token_counts: list[int], width: int, layers: int, embed_dim: int) -> float:
    """FLOPs of a CLIP text transformer at the given true token counts (2 FLOPs per multiply-add).

    Per layer and token: QKV + output projections 4w^2 and the 4x MLP 8w^2 multiply-adds, plus attention
    2 * L * w for a sequence of L tokens; then the projection to the embedding.
    """
    total = 0.0
    for n in token_counts:
        total += layers * (12 * width * width * n + 2 * n * n * width) + width * embed_dim
    return 2.0 * total


def corpus_scan_flops(num_queries: int, num_items: int, dim: int) -> float:
    return 2.0 * num_queries * num_items * dim


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_result(name: str, result: dict[str, Any], markdown: str) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` atomically (with the machine and the command)."""
    from grape_rewards.corpus.files import atomic_write_bytes

    result = {"command": command(), "machine": machine(), **result}
    atomic_write_bytes(RESULTS / f"{name}.json", (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    header = (f"Command: `{result['command']}`\n\nMachine: {json.dumps(result['machine'])}\n\n")
    atomic_write_bytes(RESULTS / f"{name}.md", markdown.replace("{header}", header).encode("utf-8"))
