"""Which ``scaled_dot_product_attention`` kernel the text towers use on a GPU: the fastest, measured once.

Rewrites are short (10-30 tokens), a shape the attention kernels handle very unevenly, and PyTorch picks a kernel
by priority, not by speed (what its pick cost on an H200: docs/shortcuts.md). So on CUDA, the first encode on a
device times each kernel PyTorch offers on a text-shaped problem (causal, the tower's heads and head size) and keeps
the fastest; every kernel computes the same attention
(results agree within floating-point tolerance). Which one wins, and by how much, ``benchmarks/bench_gpu.py``
records; it has not yet run on a GPU.

``GRAPE_SDPA_BACKEND`` overrides the choice: ``auto`` (the default: measure on CUDA, PyTorch's own pick
elsewhere), ``default`` (PyTorch's pick everywhere), or one of ``cudnn``, ``flash``, ``efficient``, ``math``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..devices import median_seconds

logger = logging.getLogger(__name__)

BACKENDS: dict[str, SDPBackend] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
"""The kernels to choose from, by the names ``GRAPE_SDPA_BACKEND`` takes."""
ENV = "GRAPE_SDPA_BACKEND"
PROBE_BATCH, PROBE_LENGTH = 256, 32
"""The problem the kernels are timed on: a batch of rewrite-length texts."""

_chosen: dict[tuple[str, torch.dtype, int, int], str | None] = {}


def requested_backend() -> str:
    """``GRAPE_SDPA_BACKEND``, checked (``auto`` when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "default", *BACKENDS):
        raise ValueError(f"{ENV}={value!r}: choose auto, default or one of {', '.join(BACKENDS)}")
    return value


def time_backends(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, repeats: int = 5,
                  batch: int = PROBE_BATCH, length: int = PROBE_LENGTH) -> dict[str, float]:
    """Median seconds of causal attention on a (batch, heads, length, head_dim) problem, per kernel that runs it.

    q, k and v are views of one packed projection, as in the text towers. Kernels that cannot run the problem on
    this device are left out.
    """
    times: dict[str, float] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each kernel that cannot run the problem says why; only the timings matter
        qkv = torch.randn(batch, length, 3, heads, head_dim, device=device, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)

        def attend() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    attend()  # warm-up, or refused
                    times[name] = median_seconds(attend, device, repeats)
            except Exception:  # "no available kernel" for this device, dtype or shape (or any other refusal)
                continue
    return times


def choose_backend(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> str | None:
    """The kernel to use for this device and attention shape (None: PyTorch's own pick); measured once per key."""
    requested = requested_backend()
    if requested == "default" or (requested == "auto" and device.type != "cuda"):
        return None
    if requested != "auto":
        return requested
    key = (str(device), dtype, heads, head_dim)
    if key not in _chosen:
        times = time_backends(device, dtype, heads, head_dim)
        _chosen[key] = min(times, key=times.__getitem__) if times else None
        logger.info("attention kernel for %s %s, %d heads of %d: %s (median ms per layer of %d x %d tokens: %s)",
                    device, dtype, heads, head_dim, _chosen[key], PROBE_BATCH, PROBE_LENGTH,
                    ", ".join(f"{n} {t * 1e3:.3f}" for n, t in times.items()))
    return _chosen[key]


@contextlib.contextmanager
def attention_backend(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> Iterator[str | None]:
    """Run the block with the kernel :func:`choose_backend` picks first (and yield its name); where that kernel
    cannot run an input (a shape the probe did not have), PyTorch falls back to the others in its usual order."""
    name = choose_backend(device, dtype, heads, head_dim)
    if name is None:
        yield None
        return
    chosen = BACKENDS[name]
    try:
        context = sdpa_kernel([chosen, *(b for b in BACKENDS.values() if b != chosen)], set_priority=True)
    except TypeError:  # torch < 2.6 has no priority order: the chosen kernel alone
        context = sdpa_kernel([chosen])
    with context:
        yield name
