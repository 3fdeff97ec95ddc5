"""Top-k search over an index: FAISS (GPU index when faiss-gpu and CUDA are present) or exact chunked torch."""

from __future__ import annotations

import importlib.util
import logging

import torch

from .rank import DEFAULT_CHUNK_ELEMENTS, chunk_rows, score_block

logger = logging.getLogger(__name__)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


@torch.inference_mode()
def torch_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int,
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, scanning the corpus in chunks and merging per-chunk top-k.

    >>> c = torch.eye(3)
    >>> torch_topk(torch.tensor([[0.1, 0.9, 0.3]]), c, 2)[1].tolist()
    [[1, 2]]
    """
    q = queries.to(device=corpus.device, dtype=torch.float32)
    best_scores = torch.full((q.shape[0], 0), float("-inf"), device=corpus.device)
    best_rows = torch.zeros((q.shape[0], 0), dtype=torch.long, device=corpus.device)
    step = chunk_rows(q.shape[0], chunk_elements)
    for start in range(0, corpus.shape[0], step):
        scores = score_block(q, corpus[start:start + step])
        s, r = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_s = torch.cat([best_scores, s], dim=1)
        merged_r = torch.cat([best_rows, r + start], dim=1)
        best_scores, pos = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
        best_rows = merged_r.gather(1, pos)
    return best_scores.cpu(), best_rows.cpu()


class TorchSearcher:
    backend = "torch"

    def __init__(self, embeddings: torch.Tensor) -> None:
        self.embeddings = embeddings

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_topk(queries, self.embeddings, k)


class FaissSearcher:
    """An exact inner-product FAISS index (``IndexFlatIP``), moved to the GPU when faiss-gpu and CUDA allow."""

    backend = "faiss"

    def __init__(self, embeddings: torch.Tensor) -> None:
        import faiss

        data = embeddings.detach().to("cpu", torch.float32).contiguous().numpy()
        index = faiss.IndexFlatIP(data.shape[1])
        if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
            self._resources = faiss.StandardGpuResources()
            device = embeddings.device.index if embeddings.device.type == "cuda" else 0
            index = faiss.index_cpu_to_gpu(self._resources, device or 0, index)
            logger.info("FAISS top-k on GPU %s", device)
        index.add(data)
        self.index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        scores, rows = self.index.search(q, k)
        return torch.from_numpy(scores), torch.from_numpy(rows).long()


def build_searcher(embeddings: torch.Tensor, backend: str = "auto") -> TorchSearcher | FaissSearcher:
    """``faiss``, ``torch`` or ``auto`` (FAISS when importable)."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown search backend {backend!r}; choose auto, faiss or torch")
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        if not faiss_available():
            raise RuntimeError("the faiss backend needs FAISS: pip install 'grape-rewards[faiss]' (CPU) or "
                               "'grape-rewards[gpu]' (GPU)")
        return FaissSearcher(embeddings)
    return TorchSearcher(embeddings)
