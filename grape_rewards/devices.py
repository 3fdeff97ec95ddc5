"""Moving data to the device that computes, without making the host wait for it."""

from __future__ import annotations

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
