"""Composed image retrieval (reference image + modification text -> target image) on any CLIP retriever."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .base import ImageInput, Retriever, TextInfo, l2_normalize

Fusion = Literal["text", "sum"]


def fuse(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor | None, mode: Fusion,
         image_weight: float) -> torch.Tensor:
    """Fuse normalised text and reference-image embeddings into normalised query vectors.

    ``text``: the text alone. ``sum``: normalize((1 - w) * text + w * image).

    >>> t, i = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    >>> fuse(t, i, "sum", 0.5)
    tensor([[0.7071, 0.7071]])
    >>> fuse(t, i, "text", 0.5)
    tensor([[1., 0.]])
    """
    if mode == "text":
        return text_embeddings
    if mode != "sum":
        raise ValueError(f"unknown fusion {mode!r}; choose 'text' or 'sum'")
    if image_embeddings is None:
        raise ValueError("sum fusion needs the reference image of every query")
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"reference embeddings {tuple(image_embeddings.shape)} do not match text embeddings "
                         f"{tuple(text_embeddings.shape)}")
    return l2_normalize((1.0 - image_weight) * text_embeddings + image_weight * image_embeddings.float())


class ComposedRetriever(Retriever):
    """Wraps a CLIP retriever; a query is a reference image plus a text, the corpus is images.

    The corpus is embedded by the base retriever, so an index built with the base retriever serves a
    composed one (same fingerprint); at reward time the reference image's embedding is read from the
    index instead of being encoded again.
    """

    corpus_modality = "image"

    def __init__(self, base: Retriever, fusion: Fusion = "sum", image_weight: float = 0.5,
                 spec: str | None = None) -> None:
        if base.corpus_modality != "image":
            raise ValueError(f"composed retrieval needs an image retriever, got {base.spec!r} (text corpus)")
        if not 0.0 <= image_weight <= 1.0:
            raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
        if fusion not in ("text", "sum"):
            raise ValueError(f"unknown fusion {fusion!r}; choose 'text' or 'sum'")
        self.base = base
        self.fusion: Fusion = fusion
        self.image_weight = image_weight
        self.spec = spec or f"composed:{base.spec}"
        self.dim = base.dim
        self.device = base.device
        self.max_text_tokens = base.max_text_tokens
        self.random_init = base.random_init

    @property
    def fingerprint(self) -> str:
        return self.base.fingerprint

    @property
    def takes_reference(self) -> bool:
        return self.fusion != "text"

    def text_info(self, texts: Sequence[str]) -> list[TextInfo]:
        return self.base.text_info(texts)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return self.base.encode_texts(texts, batch_size=batch_size)

    def encode_texts_with_info(self, texts: Sequence[str],
                               batch_size: int = 256) -> tuple[torch.Tensor, list[TextInfo]]:
        return self.base.encode_texts_with_info(texts, batch_size=batch_size)

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        return self.base.encode_images(images, batch_size=batch_size)

    def fuse_queries(self, text_embeddings: torch.Tensor, reference_embeddings: torch.Tensor | None) -> torch.Tensor:
        return fuse(text_embeddings, reference_embeddings, self.fusion, self.image_weight)

    def encode_composed(self, images: Sequence[ImageInput], texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embed (reference image, modification text) pairs as fused query vectors."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} reference images for {len(texts)} texts")
        text_emb = self.encode_texts(texts, batch_size=batch_size)
        image_emb = self.encode_images(images, batch_size=batch_size) if self.fusion != "text" else None
        return self.fuse_queries(text_emb, image_emb)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "fusion": self.fusion, "image_weight": self.image_weight, "base": self.base.spec}
