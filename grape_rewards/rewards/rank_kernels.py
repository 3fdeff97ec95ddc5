"""A fused GPU kernel for the rank scan: each query's best score and its count above a threshold, in one read.

The scan of a score chunk needs, per query row, ``max(scores)`` and ``count(scores > threshold)``. In torch that
is ``amax`` plus an in-place ``gt_`` and a ``sum``: three reads and a write of the chunk (1024 x 65,536 float32
= 256 MiB). :func:`row_max_count` reads it once (Triton), which on an H200 is the difference between ~0.4 ms and
~0.07 ms per chunk. Both results are exact (the same float32 comparisons).

Opt-in for now: ``GRAPE_FUSED_RANK=1`` turns it on (:func:`fused_available`). It is tested against torch in
Triton's interpreter (Triton 3.6 and 3.8) on the CPU, but has not yet run on a GPU: ``benchmarks/gpu.sh`` tests
it natively first and benchmarks with it only if that test passes. Without it, the scan uses torch ops.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

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
    def row_max_count_kernel(scores_ptr, thr_ptr, max_ptr, count_ptr, n_cols, stride_row, n_seg,
                             SEGMENT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        seg = tl.program_id(1)
        thr = tl.load(thr_ptr + row)
        base = scores_ptr + row.to(tl.int64) * stride_row
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        count = tl.zeros([BLOCK], tl.int32)
        first = seg * SEGMENT
        for step in range(0, SEGMENT, BLOCK):  # constant bounds: unrolled by the compiler
            offs = first + step + tl.arange(0, BLOCK)
            s = tl.load(base + offs, mask=offs < n_cols, other=float("-inf"))
            best = tl.maximum(best, s)
            count += (s > thr).to(tl.int32)
        tl.store(max_ptr + row * n_seg + seg, tl.max(best, axis=0))
        tl.store(count_ptr + row * n_seg + seg, tl.sum(count, axis=0))

    return row_max_count_kernel


@functools.cache
def fused_available() -> bool:
    """Whether the scan uses :func:`row_max_count`: switched on with ``GRAPE_FUSED_RANK=1``, Triton importable and a
    CUDA device present."""
    if os.environ.get("GRAPE_FUSED_RANK", "0") != "1" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def row_max_count(scores: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the (Q, B) float32 ``scores``: the maximum, and how many entries exceed ``threshold`` (Q,).

    Equal to ``scores.amax(1)`` and ``(scores > threshold[:, None]).sum(1)`` (int64) for finite thresholds and
    scores without NaN; ``-inf`` entries (masked pairs) never count and never win the maximum.
    """
    if scores.dtype != torch.float32 or scores.ndim != 2 or scores.stride(1) != 1:
        raise ValueError("row_max_count needs a 2-D float32 tensor with contiguous rows")
    rows, cols = scores.shape
    n_seg = max(1, -(-cols // SEGMENT))
    out_max = torch.empty(rows, n_seg, dtype=torch.float32, device=scores.device)
    out_count = torch.empty(rows, n_seg, dtype=torch.int32, device=scores.device)
    if rows:
        thr = threshold.to(device=scores.device, dtype=torch.float32).reshape(rows).contiguous()
        _kernel()[(rows, n_seg)](scores, thr, out_max, out_count, cols, scores.stride(0), n_seg,
                                 SEGMENT=SEGMENT, BLOCK=BLOCK)
    return out_max.amax(1), out_count.sum(1, dtype=torch.int64)
