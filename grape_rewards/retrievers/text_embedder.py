"""A text-embedding retriever: a transformers encoder, mean-pooled over real tokens, L2-normalised.

This is how sentence-transformers models such as all-MiniLM-L6-v2 embed text; the corpus is text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import (
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


class TextEmbedder(Retriever):
    """Mean-pooled transformers encoder (BERT, MiniLM, XLM-R, ...) for text corpora.

    Args:
        model: a local model folder or a hub name (downloaded if the hub is reachable).
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        max_length: context length; default: the folder's ``sentence_bert_config.json`` ``max_seq_length``,
            else the tokenizer's/model's limit.
        random_init: build the architecture from its config with random weights (tests, benchmarks).
    """

    corpus_modality = "text"

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
        self.spec = spec or f"text:{model}"
        self.device = resolve_device(device)
        self.random_init = random_init
        model = resolve_model_path(model)
        self.model, self.tokenizer = load_hf_parts(model, kind="text", random_init=random_init, seed=seed,
                                                   spec=self.spec)
        self.model.eval().to(self.device)
        self.max_text_tokens = max_length or _default_max_length(model, self.model, self.tokenizer)
        self.dim = int(self.model.config.hidden_size)
        self._seed = seed
        self._fingerprint: str | None = None
        self.dtype = resolve_dtype(dtype, self.device)
        cast_model(self, self.model, self.dtype)
        if random_init:
            warn_random_init(self.spec)

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self, self.model, "text-embedder", "mean-pool", self.max_text_tokens)

    def text_info(self, texts: Sequence[str]) -> list[TextInfo]:
        return tokenizer_text_info(self.tokenizer, texts, self.max_text_tokens)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return self.encode_texts_with_info(texts, batch_size)[0]

    @torch.no_grad()
    def encode_texts_with_info(self, texts: Sequence[str],
                               batch_size: int = 256) -> tuple[torch.Tensor, list[TextInfo]]:
        """Tokenize once; batches of similar length pad little, and mean pooling over the attention mask makes the
        result the same as one padded batch."""
        ids, infos = tokenize_once(self.tokenizer, texts, self.max_text_tokens)
        return encode_in_length_groups(ids, batch_size, self.dim, self.device, self._encode_batch), infos

    def _encode_batch(self, ids: list[Sequence[int]]) -> torch.Tensor:
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _default_max_length(model_path: str, model: torch.nn.Module, tokenizer: object) -> int:
    st_config = Path(model_path) / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 100_000]
    return min(limits) if limits else 512
