"""Shared fixtures: tiny seeded model folders (built once per session) and retrievers loaded on CPU.

Folders (``pathlib.Path``): ``open_clip_dir``, ``hf_clip_dir``, ``chinese_clip_dir``, ``text_encoder_dir``.
Images: ``images`` (8 distinct PNG paths, alone in one folder).
Retrievers: ``tiny_open_clip`` (OpenCLIPRetriever, 32-d), ``tiny_hf_clip`` (HFCLIPRetriever, 16-d),
``minilm`` (the real packaged all-MiniLM-L6-v2, 384-d). Index: ``demo_index_dir`` (the demo captions, MiniLM).
The retrievers are shared by the whole session: do not mutate them (use ``monkeypatch`` on attributes).
Ray's clusters keep their sessions in a folder of the run, removed at its end with anything still running from it,
also after Ctrl-C (``ray_cleanup``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ray_cleanup import pytest_configure, pytest_unconfigure  # noqa: F401  (hooks: Ray stops with the run)
from tiny_models import draw_images, make_hf_clip_dir, make_open_clip_dir, make_text_encoder_dir

from grape_rewards.retrievers import HFCLIPRetriever, OpenCLIPRetriever, TextEmbedder, create_retriever


@pytest.fixture(scope="session")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip ``local-dir:`` folder of the tiny seeded model (``tiny_models.TINY_OPEN_CLIP_CFG``)."""
    return make_open_clip_dir(tmp_path_factory.mktemp("open_clip_tiny"))


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers CLIPModel folder (tiny, seeded, MiniLM BERT tokenizer, 77-token context)."""
    return make_hf_clip_dir(tmp_path_factory.mktemp("hf_clip_tiny"), kind="clip")


@pytest.fixture(scope="session")
def chinese_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers ChineseCLIPModel folder (tiny, seeded, MiniLM BERT tokenizer, 52-token context)."""
    return make_hf_clip_dir(tmp_path_factory.mktemp("chinese_clip_tiny"), kind="chinese_clip")


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder folder with the MiniLM tokenizer (32-d, 128-token context)."""
    return make_text_encoder_dir(tmp_path_factory.mktemp("text_encoder_tiny"))


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight distinct small PNG files (``img_000.png`` ...), alone in their folder: ``images[0].parent`` is an
    image-folder corpus of exactly these."""
    return draw_images(tmp_path_factory.mktemp("images"), n=8, seed=0)


@pytest.fixture(scope="session")
def tiny_open_clip(open_clip_dir: Path) -> OpenCLIPRetriever:
    """The tiny open_clip model as a retriever on CPU (spec ``open_clip:local-dir:<open_clip_dir>``)."""
    return create_retriever(f"open_clip:local-dir:{open_clip_dir}", device="cpu")  # type: ignore[return-value]


@pytest.fixture(scope="session")
def tiny_hf_clip(hf_clip_dir: Path) -> HFCLIPRetriever:
    """The tiny transformers CLIP model as a retriever on CPU (spec ``hf:<hf_clip_dir>``)."""
    return create_retriever(f"hf:{hf_clip_dir}", device="cpu")  # type: ignore[return-value]


@pytest.fixture(scope="session")
def minilm() -> TextEmbedder:
    """The real packaged all-MiniLM-L6-v2 text embedder on CPU (spec ``text:all-MiniLM-L6-v2``)."""
    return create_retriever("text:all-MiniLM-L6-v2", device="cpu")  # type: ignore[return-value]


@pytest.fixture(scope="session")
def demo_index_dir(minilm: TextEmbedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 100 demo captions embedded by MiniLM (read-only: load it, do not write into it)."""
    from grape_rewards.corpus import build_index, read_source
    from grape_rewards.demo import data_path

    out = tmp_path_factory.mktemp("demo_index") / "captions"
    build_index(read_source(data_path("captions.jsonl")), minilm, out, progress=False)
    return out
