"""transformers CLIP-family retrievers: CLIPModel, ChineseCLIPModel, SiglipModel, and any model with
``get_text_features`` / ``get_image_features``, from a hub name or a local folder."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    MAX_PADDING,
    ImageInput,
    Retriever,
    TextInfo,
    batched,
    cast_model,
    encode_in_length_groups,
    l2_normalize,
    load_image,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    tokenize_once,
    tokenizer_text_info,
    warn_random_init,
)
from .loading import load_hf_parts

# Towers that pool the last position need every text padded to the full context, as in training.
_PAD_TO_MAX_LENGTH = ("siglip", "siglip2")


def _features(output: object) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x returns an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


class HFCLIPRetriever(Retriever):
    """A transformers dual encoder with ``get_text_features`` and ``get_image_features``.

    Texts are padded to the longest of their batch (batches are formed by length), which is exact for
    towers that pool with the attention mask (CLIP's EOS pooling, Chinese-CLIP's [CLS]); SigLIP is
    padded to its full context, as it was trained.
    """

    corpus_modality = "image"

    def __init__(
        self,
        model: str,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        random_init: bool = False,
        seed: int = 0,
        spec: str | None = None,
    ) -> None:
        self.spec = spec or f"hf:{model}"
        self.device = resolve_device(device)
        self.random_init = random_init
        self.model, self.tokenizer, self.processor = load_hf_parts(
            model, kind="clip", random_init=random_init, seed=seed, spec=self.spec)
        for method in ("get_text_features", "get_image_features"):
            if not hasattr(self.model, method):
                raise TypeError(f"{type(self.model).__name__} (from {self.spec!r}) has no {method}(); "
                                "hf: retrievers need a CLIP-family model; use text:<model> for text encoders")
        self.model.eval().to(self.device)
        config = self.model.config
        self._model_type = str(getattr(config, "model_type", ""))
        text_cfg = getattr(config, "text_config", config)
        limits = [getattr(text_cfg, "max_position_embeddings", None), getattr(self.tokenizer, "model_max_length", None)]
        self.max_text_tokens = min((int(v) for v in limits if isinstance(v, int) and 0 < v < 100_000), default=77)
        self.dim = int(getattr(config, "projection_dim", None) or text_cfg.hidden_size)
        self._fingerprint: str | None = None
        self.dtype = resolve_dtype(dtype, self.device)
        cast_model(self, self.model, self.dtype)
        if random_init:
            warn_random_init(self.spec)

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self, self.model, "hf-clip", self._model_type, self.processor.to_json_string(),
                                 self.max_text_tokens)

    def text_info(self, texts: Sequence[str]) -> list[TextInfo]:
        return tokenizer_text_info(self.tokenizer, texts, self.max_text_tokens)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return self.encode_texts_with_info(texts, batch_size)[0]

    @torch.no_grad()
    def encode_texts_with_info(self, texts: Sequence[str],
                               batch_size: int = 256) -> tuple[torch.Tensor, list[TextInfo]]:
        """Tokenize once, then encode in batches of similar length (padding is masked out of the result)."""
        ids, infos = tokenize_once(self.tokenizer, texts, self.max_text_tokens)
        max_padding = 1.0 if self._model_type in _PAD_TO_MAX_LENGTH else MAX_PADDING  # those pad to the context
        return encode_in_length_groups(ids, batch_size, self.dim, self.device, self._encode_batch, max_padding), infos

    def _encode_batch(self, ids: list[Sequence[int]]) -> torch.Tensor:
        full = self._model_type in _PAD_TO_MAX_LENGTH
        padding = {"padding": "max_length", "max_length": self.max_text_tokens} if full else {}
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", **padding).to(self.device)
        if full:
            enc.pop("attention_mask", None)
        return _features(self.model.get_text_features(**enc))

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        chunks = []
        for batch in batched(list(images), batch_size):
            pixels = self.processor(images=[load_image(im) for im in batch], return_tensors="pt")["pixel_values"]
            feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            chunks.append(l2_normalize(feats))
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim, device=self.device)
