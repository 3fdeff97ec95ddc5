"""transformers CLIP-family retrievers: CLIPModel, ChineseCLIPModel, SiglipModel, and any model with
``get_text_features`` / ``get_image_features``, from a hub name or a local folder."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import ImageInput, batched, l2_normalize, load_image
from .transformers_base import TransformersRetriever, context_length

# Towers that pool the last position need every text padded to the full context, as in training.
_PAD_TO_MAX_LENGTH = ("siglip", "siglip2")


def _features(output: object) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x returns an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


class HFCLIPRetriever(TransformersRetriever):
    """A transformers dual encoder with ``get_text_features`` and ``get_image_features``.

    Texts are padded to the longest of their batch (batches are formed by length), which is exact for
    towers that pool with the attention mask (CLIP's EOS pooling, Chinese-CLIP's [CLS]); SigLIP is
    padded to its full context, as it was trained.
    """

    corpus_modality = "image"
    kind = "clip"

    def __init__(
        self,
        model: str,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        random_init: bool = False,
        seed: int = 0,
        spec: str | None = None,
    ) -> None:
        super().__init__(model, spec or f"hf:{model}", device=device, dtype=dtype, random_init=random_init, seed=seed)
        self.pads_to_context = str(getattr(self.model.config, "model_type", "")) in _PAD_TO_MAX_LENGTH
        """SigLIP-style towers pool the last position: every text is padded to the full context, as in training."""
        if self.pads_to_context:
            self.max_padding = 1.0  # grouping by length buys nothing when every batch is padded to the context

    def _default_context_length(self) -> int:
        return context_length(self.model.config, self.tokenizer, default=77)

    def _embedding_dim(self) -> int:
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or getattr(config, "text_config", config).hidden_size)

    def _fingerprint_settings(self) -> tuple[object, ...]:
        return ("hf-clip", str(getattr(self.model.config, "model_type", "")), self.processor.to_json_string(),
                self.max_text_tokens)

    def _encode_batch(self, ids: list[Sequence[int]]) -> torch.Tensor:
        full = self.pads_to_context
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
