"""Moving data to the device that computes without making the host wait for it, and timing work on it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, without making the host wait for the GPU.

    A plain ``.to("cuda")`` from pageable memory waits until every kernel queued before it has run, which in a
    scan would stall the host once per copy (PyTorch's caching host allocator keeps the pinned buffer alive until
    the copy is done).

    >>> to_device(torch.arange(3), torch.device("cpu")).tolist()
    [0, 1, 2]
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, each waited for on ``device`` (a GPU runs asynchronously).

    >>> median_seconds(lambda: None, torch.device("cpu"), repeats=3) >= 0
    True
    """
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
