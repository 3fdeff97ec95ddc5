"""A fused GPU kernel for the rank scan: each query's best score and its counts above two thresholds, in one read.

The scan of a score chunk needs, per query row, ``max(scores)``, ``count(scores > high)`` and
``count(scores > low)`` (the two edges of the band of near-ties that are decided exactly: see
:func:`~grape_rewards.corpus.rank.tie_band`). In torch that is ``amax`` plus two comparisons and sums: several
reads of the chunk (1024 x 65,536 float32 = 256 MiB; its cost on an H200: benchmarks/results/gpu-h200.md).
:func:`row_max_count` reads it once (Triton). Every result is exact (the same float32 comparisons; a score equal to a
threshold is not above it), so they must be equal bit for bit.

``GRAPE_FUSED_RANK`` chooses: ``auto`` (the default) checks the kernel on each GPU the first time a scan runs
there (:func:`probe`: a chunk-sized problem with masked entries and ties, results compared with torch's exactly,
both timed) and uses it only if it is equal and faster; ``1`` uses it without the check, ``0`` never. Off the GPU,
or without Triton, the scan uses torch ops. The kernel is tested against torch in Triton's interpreter on the CPU
(Triton 3.6 and 3.8); ``benchmarks/gpu.sh`` tests it natively.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from ..devices import median_seconds

logger = logging.getLogger(__name__)

SEGMENT = 16_384
"""Columns per program: a row is split in segments so that a few queries still fill the GPU."""
BLOCK = 2_048
"""Columns per loop step inside a program."""


@functools.cache
def _kernel() -> Any:
    """Compile-on-first-use: importing this module needs no Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_max_count_kernel(scores_ptr, high_ptr, low_ptr, max_ptr, high_count_ptr, low_count_ptr, n_cols,
                             stride_row, n_seg, SEGMENT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        seg = tl.program_id(1)
        high = tl.load(high_ptr + row)
        low = tl.load(low_ptr + row)
        base = scores_ptr + row.to(tl.int64) * stride_row
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        above_high = tl.zeros([BLOCK], tl.int32)
        above_low = tl.zeros([BLOCK], tl.int32)
        first = seg * SEGMENT
        for step in range(0, SEGMENT, BLOCK):  # constant bounds: unrolled by the compiler
            offs = first + step + tl.arange(0, BLOCK)
            s = tl.load(base + offs, mask=offs < n_cols, other=float("-inf"))
            best = tl.maximum(best, s)
            above_high += (s > high).to(tl.int32)
            above_low += (s > low).to(tl.int32)
        tl.store(max_ptr + row * n_seg + seg, tl.max(best, axis=0))
        tl.store(high_count_ptr + row * n_seg + seg, tl.sum(above_high, axis=0))
        tl.store(low_count_ptr + row * n_seg + seg, tl.sum(above_low, axis=0))

    return row_max_count_kernel


ENV = "GRAPE_FUSED_RANK"


def fused_mode() -> str:
    """``GRAPE_FUSED_RANK`` read as ``auto``, ``on`` or ``off``."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    modes = {"auto": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off", "false": "off"}
    if value not in modes:
        raise ValueError(f"{ENV}={value!r}: choose auto (check, then use if equal and faster), 1 or 0")
    return modes[value]


@functools.cache
def triton_importable() -> bool:
    """Whether Triton can be imported here (the kernel compiles on first use)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_checked: dict[str, bool] = {}
"""Per device: whether :func:`probe` found the kernel equal to torch and faster."""


def use_fused(device: torch.device) -> bool:
    """Whether scans on ``device`` take :func:`row_max_count` (see the module's docstring)."""
    if device.type != "cuda" or not triton_importable():
        return False
    mode = fused_mode()
    if mode != "auto":
        return mode == "on"
    key = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    if key not in _checked:
        result = probe(torch.device(key))
        _checked[key] = bool(result["equal"] and result["fused_ms"] < result["torch_ms"])
        log = logger.info if result["equal"] else logger.warning
        log("fused rank kernel on %s: %s (%s)", key, "used" if _checked[key] else "not used", result)
    return _checked[key]


def probe(device: torch.device, rows: int = 1024, cols: int = 65_536, repeats: int = 5) -> dict[str, Any]:
    """Run :func:`row_max_count` and the torch ops on one random score chunk: ``equal`` (bit for bit), and the
    median ms of each (``fused_ms``, ``torch_ms``); ``error`` says why the kernel did not run, if it did not."""
    out: dict[str, Any] = {"equal": False, "fused_ms": float("inf"), "torch_ms": float("inf"), "error": None}
    try:  # no compiler for this GPU, an old Triton, no memory left for the probe...: the torch path is always there
        g = torch.Generator(device=device).manual_seed(0)
        scores = torch.randn(rows, cols, device=device, generator=g)
        high = torch.randn(rows, device=device, generator=g)
        low = high - 1e-3
        scores[:, :7] = float("-inf")  # masked pairs
        scores[:, 7] = high  # ties: not above
        scores[:, 8] = low
        if rows:
            high[-1] = low[-1] = float("-inf")  # everything finite is above

        def torch_ops() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return scores.amax(1), (scores > high[:, None]).sum(1), (scores > low[:, None]).sum(1)

        want, got = torch_ops(), row_max_count(scores, high, low)
        out["equal"] = all(torch.equal(a, b) for a, b in zip(got, want))
        out["fused_ms"] = median_seconds(lambda: row_max_count(scores, high, low), device, repeats) * 1e3
        out["torch_ms"] = median_seconds(torch_ops, device, repeats) * 1e3
    except Exception as exc:
        out["equal"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def row_max_count(scores: torch.Tensor, high: torch.Tensor,
                  low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of the (Q, B) float32 ``scores``: the maximum, and how many entries exceed ``high`` and ``low`` (Q,).

    Equal to ``scores.amax(1)``, ``(scores > high[:, None]).sum(1)`` and ``(scores > low[:, None]).sum(1)``
    (int64) for scores without NaN; an entry equal to a threshold is not above it (ties stay ties), and ``-inf``
    entries (masked pairs) never count and never win the maximum.
    """
    if scores.dtype != torch.float32 or scores.ndim != 2 or scores.stride(1) != 1:
        raise ValueError("row_max_count needs a 2-D float32 tensor with contiguous rows")
    rows, cols = scores.shape
    n_seg = max(1, -(-cols // SEGMENT))
    out_max = torch.empty(rows, n_seg, dtype=torch.float32, device=scores.device)
    out_high = torch.empty(rows, n_seg, dtype=torch.int32, device=scores.device)
    out_low = torch.empty(rows, n_seg, dtype=torch.int32, device=scores.device)
    if rows:
        hi, lo = (t.to(device=scores.device, dtype=torch.float32).reshape(rows).contiguous() for t in (high, low))
        _kernel()[(rows, n_seg)](scores, hi, lo, out_max, out_high, out_low, cols, scores.stride(0), n_seg,
                                 SEGMENT=SEGMENT, BLOCK=BLOCK)
    return out_max.amax(1), out_high.sum(1, dtype=torch.int64), out_low.sum(1, dtype=torch.int64)
