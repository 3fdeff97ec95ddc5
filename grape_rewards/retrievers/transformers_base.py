"""What the transformers retrievers share: loading (a local folder or a hub name, or random weights from the
config), the context length, tokenizing once and encoding in batches of similar length.

:class:`~grape_rewards.retrievers.hf_clip.HFCLIPRetriever` and
:class:`~grape_rewards.retrievers.text_embedder.TextEmbedder` only say how one padded batch becomes vectors, how
images are embedded (CLIP) and what else their fingerprint covers.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch

from .base import (
    MAX_PADDING,
    Retriever,
    TextInfo,
    cast_model,
    encode_in_length_groups,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    tokenize_once,
    tokenizer_text_info,
    warn_random_init,
)
from .loading import load_hf_parts, resolve_model_path


def context_length(config: Any, tokenizer: Any, default: int) -> int:
    """The smaller of the text config's ``max_position_embeddings`` and the tokenizer's ``model_max_length``
    (values outside 1..99,999, such as the tokenizers' "no limit" sentinel, are ignored), else ``default``.

    >>> from types import SimpleNamespace as NS
    >>> context_length(NS(max_position_embeddings=512), NS(model_max_length=int(1e30)), default=77)
    512
    >>> context_length(NS(), NS(), default=77)
    77
    """
    text_config = getattr(config, "text_config", config)
    limits = [getattr(text_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min((int(v) for v in limits if isinstance(v, int) and 0 < v < 100_000), default=default)


class TransformersRetriever(Retriever):
    """A transformers text tower, loaded once, whose texts are tokenized once and encoded in length groups.

    Subclasses set ``kind`` (what :func:`~grape_rewards.retrievers.loading.load_hf_parts` loads), implement
    :meth:`_encode_batch` (one padded batch of token ids to unnormalised vectors), :meth:`_embedding_dim` and
    :meth:`_fingerprint_settings`, and may override :meth:`_default_context_length` and ``max_padding``.
    """

    kind: ClassVar[Literal["text", "clip"]]
    max_padding: float = MAX_PADDING
    """Largest share of padding in an encoding batch (1.0 for towers that pad every text to the full context)."""

    def __init__(
        self,
        model: str,
        spec: str,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        max_length: int | None = None,
        random_init: bool = False,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.random_init = random_init
        self.model_path = resolve_model_path(model)
        parts = load_hf_parts(self.model_path, kind=self.kind, random_init=random_init, seed=seed, spec=spec)
        self.model, self.tokenizer = parts[0], parts[1]
        self.processor: Any = parts[2] if self.kind == "clip" else None
        self.model.eval().to(self.device)
        self.max_text_tokens = max_length or self._default_context_length()
        self.dim = self._embedding_dim()
        self._fingerprint: str | None = None
        self.dtype = resolve_dtype(dtype, self.device)
        cast_model(self, self.model, self.dtype)
        if random_init:
            warn_random_init(self.spec)

    def _default_context_length(self) -> int:
        return context_length(self.model.config, self.tokenizer, default=512)

    @abstractmethod
    def _embedding_dim(self) -> int:
        """Width of the vectors :meth:`_encode_batch` returns."""

    @abstractmethod
    def _fingerprint_settings(self) -> tuple[object, ...]:
        """The settings besides the weights that decide the corpus embeddings (hashed into the fingerprint)."""

    @abstractmethod
    def _encode_batch(self, ids: list[Sequence[int]]) -> torch.Tensor:
        """Pad one batch of token id lists, run the model, return (n, dim) vectors (normalised by the caller)."""

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self, self.model, *self._fingerprint_settings())

    def text_info(self, texts: Sequence[str]) -> list[TextInfo]:
        return tokenizer_text_info(self.tokenizer, texts, self.max_text_tokens)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return self.encode_texts_with_info(texts, batch_size)[0]

    @torch.no_grad()
    def encode_texts_with_info(self, texts: Sequence[str],
                               batch_size: int = 256) -> tuple[torch.Tensor, list[TextInfo]]:
        """Tokenize once, then encode in batches of similar length (padding is masked out of the result)."""
        ids, infos = tokenize_once(self.tokenizer, texts, self.max_text_tokens)
        return encode_in_length_groups(ids, batch_size, self.dim, self.device, self._encode_batch,
                                       self.max_padding), infos
