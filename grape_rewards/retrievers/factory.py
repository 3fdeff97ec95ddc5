"""Build a retriever from a spec string or a config.

Spec strings (the way open_clip names models by data, not code)::

    open_clip:ViT-B-32/openai                 architecture / pretrained tag
    open_clip:ViT-B-32//path/to/weights.bin   architecture / local checkpoint
    open_clip:local-dir:/path/to/folder       a folder with open_clip_config.json and weights
    hf:openai/clip-vit-base-patch32           a transformers CLIP-family model (hub name or folder)
    hf:OFA-Sys/chinese-clip-vit-base-patch16
    text:all-MiniLM-L6-v2                     a text embedder (this alias is the packaged MiniLM)
    text:/path/to/encoder                     any transformers encoder folder, mean-pooled
    composed:open_clip:ViT-L-14/openai        reference image + text -> image, on a CLIP retriever
    /path/to/folder                           detected from the files in it
    random:<spec>                             random weights (tests and benchmarks only; loudly warned)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .base import Retriever

KINDS = ("open_clip", "hf", "text", "composed")
_CLIP_MODEL_TYPES = ("clip", "chinese_clip", "siglip", "siglip2", "altclip", "clipseg", "metaclip_2", "x_clip")


class RetrieverConfig(BaseModel):
    """Everything needed to build a retriever; ``spec`` is one of the strings in the module docstring."""

    model_config = ConfigDict(extra="forbid")

    spec: str
    device: str = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Inference precision of the encoder: ``auto`` is fp16 on CUDA, fp32 on the CPU. Not part of the fingerprint."""
    random_init: bool = False
    """Random weights (also set by a ``random:`` prefix on the spec)."""
    seed: int = 0
    """Seed of the random weights."""
    fusion: Literal["text", "sum"] = "sum"
    """Composed retrieval: the rewrite alone, or the weighted sum of reference image and text."""
    image_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    """Composed retrieval, ``sum`` fusion: the reference image's weight."""
    max_length: int | None = None
    """Text embedders: context length override."""
    model_cfg: dict[str, Any] | None = None
    """open_clip: an architecture given as data (its JSON config), registered under the spec's name."""


def parse_spec(spec: str) -> tuple[bool, str, str]:
    """Split a spec into (random_init, kind, rest).

    >>> parse_spec("random:open_clip:ViT-B-32")
    (True, 'open_clip', 'ViT-B-32')
    >>> parse_spec("composed:hf:openai/clip-vit-base-patch32")
    (False, 'composed', 'hf:openai/clip-vit-base-patch32')
    """
    random_init = False
    if spec.startswith("random:"):
        random_init, spec = True, spec[len("random:"):]
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        return random_init, kind, rest
    path = Path(spec).expanduser()
    if path.is_dir():
        return random_init, detect_kind(path), str(path)
    raise ValueError(
        f"cannot read retriever spec {spec!r}: expected one of "
        + ", ".join(f"{k}:<...>" for k in KINDS)
        + ", an existing model folder, or random:<spec> (e.g. open_clip:ViT-B-32/openai, text:all-MiniLM-L6-v2)")


def detect_kind(folder: Path) -> str:
    """``open_clip`` for a folder with open_clip_config.json, ``hf`` for a CLIP-family config.json, else ``text``."""
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} holds neither open_clip_config.json nor config.json, so it is not a model folder; "
                         "pass a folder with open_clip_config.json and weights (open_clip), or one saved with "
                         "transformers' save_pretrained (config.json, weights, tokenizer files)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") in _CLIP_MODEL_TYPES or "vision_config" in config:
        return "hf"
    return "text"


def create_retriever(spec: str | RetrieverConfig, **overrides: Any) -> Retriever:
    """Build the retriever a spec (or config) names, e.g. ``create_retriever("text:all-MiniLM-L6-v2")``.

    Keyword overrides set config fields (``device="cpu"``, ``fusion="text"``, ...).
    """
    config = RetrieverConfig(spec=spec, **overrides) if isinstance(spec, str) else spec.model_copy(update=overrides)
    random_prefix, kind, rest = parse_spec(config.spec)
    random_init = config.random_init or random_prefix
    common = {"device": config.device, "dtype": config.dtype, "random_init": random_init, "seed": config.seed,
              "spec": config.spec}
    if kind == "composed":
        from .composed import ComposedRetriever

        base_spec = ("random:" if random_prefix else "") + rest
        base = create_retriever(config.model_copy(update={"spec": base_spec}))
        return ComposedRetriever(base, fusion=config.fusion, image_weight=config.image_weight, spec=config.spec)
    if kind == "open_clip":
        from .openclip import OpenCLIPRetriever

        if Path(rest).expanduser().is_dir():
            rest = f"local-dir:{Path(rest).expanduser()}"
        if rest.startswith(("local-dir:", "hf-hub:")):
            name, pretrained = rest, None
        else:
            name, _, pretrained = rest.partition("/")
        return OpenCLIPRetriever(name, pretrained=pretrained or None, model_cfg=config.model_cfg, **common)
    if kind == "hf":
        from .hf_clip import HFCLIPRetriever

        return HFCLIPRetriever(rest, **common)
    from .text_embedder import TextEmbedder

    return TextEmbedder(rest, max_length=config.max_length, **common)
