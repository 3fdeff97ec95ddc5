"""A text-embedding retriever: a transformers encoder, mean-pooled over real tokens, L2-normalised.

This is how sentence-transformers models such as all-MiniLM-L6-v2 embed text; the corpus is text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .transformers_base import TransformersRetriever


class TextEmbedder(TransformersRetriever):
    """Mean-pooled transformers encoder (BERT, MiniLM, XLM-R, ...) for text corpora.

    Args:
        model: a local model folder or a hub name (downloaded if the hub is reachable).
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        max_length: context length; default: the folder's ``sentence_bert_config.json`` ``max_seq_length``,
            else the tokenizer's/model's limit.
        random_init: build the architecture from its config with random weights (tests, benchmarks).
    """

    corpus_modality = "text"
    kind = "text"

    def __init__(
        self,
        model: str,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        max_length: int | None = None,
        random_init: bool = False,
        seed: int = 0,
        spec: str | None = None,
    ) -> None:
        super().__init__(model, spec or f"text:{model}", device=device, dtype=dtype, max_length=max_length,
                         random_init=random_init, seed=seed)

    def _default_context_length(self) -> int:
        st_config = Path(self.model_path) / "sentence_bert_config.json"
        if st_config.is_file():
            value = json.loads(st_config.read_text()).get("max_seq_length")
            if value:
                return int(value)
        return super()._default_context_length()

    def _embedding_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _fingerprint_settings(self) -> tuple[object, ...]:
        return "text-embedder", "mean-pool", self.max_text_tokens

    def _encode_batch(self, ids: list[Sequence[int]]) -> torch.Tensor:
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
