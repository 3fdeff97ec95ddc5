"""The one interface every retriever implements."""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch
from PIL import Image

from ..devices import to_device

logger = logging.getLogger(__name__)

ImageInput = Union[Image.Image, str, Path]
"""An image, or the path of an image file."""

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class TextInfo:
    """How the retriever's tokenizer sees one text."""

    num_tokens: int
    """Tokens the full text needs, special tokens included (may exceed the context length)."""
    truncated: bool
    """Whether the tokenizer had to cut the text to fit the context length."""


class Retriever(ABC):
    """A frozen dual encoder: texts (and images, or composed queries) to L2-normalised vectors.

    Every ``encode_*`` method returns a float32 tensor of shape (n, ``dim``) on ``device`` whose
    rows have unit L2 norm (an ordinary tensor without grad, not an inference-mode one: callers may
    modify it in place). ``corpus_modality`` says what the corpus items are (``image`` for
    CLIP-style retrievers, ``text`` for text embedders); :meth:`encode_corpus` embeds them.
    """

    spec: str
    """The spec string this retriever was built from (see :func:`grape_rewards.retrievers.create_retriever`)."""
    dim: int
    """Embedding dimension."""
    device: torch.device
    max_text_tokens: int
    """The text encoder's context length, special tokens included."""
    corpus_modality: Modality
    random_init: bool = False
    """True when the weights were randomly initialised (tests, benchmarks): embeddings carry no meaning."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A digest of everything that decides the corpus embeddings (architecture, weights, preprocessing).

        An index built with one fingerprint must not be served with a retriever of another.
        Random-initialised retrievers' fingerprints start with ``random-init-``.
        """

    @abstractmethod
    def text_info(self, texts: Sequence[str]) -> list[TextInfo]:
        """Token count and truncation flag of each text under this retriever's tokenizer."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Embed texts (truncated to the context length) as (n, dim) unit vectors."""

    def encode_texts_with_info(self, texts: Sequence[str],
                               batch_size: int = 256) -> tuple[torch.Tensor, list[TextInfo]]:
        """:meth:`encode_texts` and :meth:`text_info` together (retrievers that can tokenize once override it)."""
        return self.encode_texts(texts, batch_size=batch_size), self.text_info(texts)

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        """Embed images as (n, dim) unit vectors."""
        raise NotImplementedError(f"{type(self).__name__} ({self.spec}) does not encode images")

    def encode_corpus(self, items: Sequence[ImageInput] | Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embed corpus items of this retriever's ``corpus_modality``."""
        if self.corpus_modality == "image":
            return self.encode_images(items, batch_size=batch_size)  # type: ignore[arg-type]
        return self.encode_texts(items, batch_size=batch_size)  # type: ignore[arg-type]

    def fuse_queries(self, text_embeddings: torch.Tensor, reference_embeddings: torch.Tensor | None) -> torch.Tensor:
        """Turn text embeddings (and, for composed retrieval, reference-image embeddings) into query vectors.

        Plain retrievers ignore the reference; :class:`~grape_rewards.retrievers.composed.ComposedRetriever`
        fuses it.
        """
        return text_embeddings

    @property
    def takes_reference(self) -> bool:
        """Whether queries combine a reference image with the text (composed retrieval)."""
        return False

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for manifests and ``/info``."""
        return {
            "spec": self.spec,
            "type": type(self).__name__,
            "dim": self.dim,
            "max_text_tokens": self.max_text_tokens,
            "corpus_modality": self.corpus_modality,
            "fingerprint": self.fingerprint,
            "random_init": self.random_init,
        }


def model_fingerprint(retriever: Retriever, model: torch.nn.Module, *extra: object) -> str:
    """The fingerprint of ``model``'s weights and ``extra`` settings, computed once and cached on the retriever."""
    cached = getattr(retriever, "_fingerprint", None)
    if cached is None:
        cached = ("random-init-" if retriever.random_init else "") + weights_digest(model, *extra)[:32]
        retriever._fingerprint = cached  # type: ignore[attr-defined]
    return cached


def tokenizer_text_info(tokenizer: object, texts: Sequence[str], max_tokens: int) -> list[TextInfo]:
    """Token counts of a transformers tokenizer (special tokens included), and whether they exceed ``max_tokens``."""
    return tokenize_once(tokenizer, texts, max_tokens)[1]


MAX_PADDING = 0.15
"""Largest share of padding in a batch of texts (see :func:`length_groups`)."""


def length_groups(lengths: Sequence[int], max_size: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of texts grouped into batches that pad little: by length, a batch closes when adding the next text
    would make more than ``max_padding`` of its padded tokens padding, or at ``max_size`` texts.

    The result does not depend on the grouping (padding is masked out), only the speed: what it buys is in
    docs/shortcuts.md.

    >>> length_groups([5, 3, 3, 9, 4], max_size=8, max_padding=0.25)
    [[1, 2, 4, 0], [3]]
    >>> length_groups([2, 2, 2], max_size=2)
    [[0, 1], [2]]
    """
    if max_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {max_size}")
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if group and (len(group) == max_size or (len(group) + 1) * n - (real + n) > max_padding * (len(group) + 1) * n):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += n
    if group:
        groups.append(group)
    return groups


def tokenize_once(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> tuple[list[list[int]], list[TextInfo]]:
    """A transformers tokenizer's ids of each text, cut to ``max_tokens`` as the tokenizer cuts them (special tokens
    kept), and how it sees each text (:class:`TextInfo`, from the uncut count)."""
    if not texts:
        return [], []
    ids: list[list[int]] = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
    infos = [TextInfo(num_tokens=len(x), truncated=len(x) > max_tokens) for x in ids]
    long = [i for i, x in enumerate(ids) if len(x) > max_tokens]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_tokens, verbose=False)["input_ids"]
        for i, x in zip(long, cut):
            ids[i] = x
    return ids, infos


def encode_in_length_groups(ids: Sequence[Sequence[int]], batch_size: int, dim: int, device: torch.device,
                            encode_batch: Callable[[list[Sequence[int]]], torch.Tensor],
                            max_padding: float = MAX_PADDING) -> torch.Tensor:
    """Encode token id lists in batches of similar length (:func:`length_groups`); unit rows in the input order.

    ``encode_batch`` pads one batch and runs the model; the result does not depend on the grouping (padding is
    masked), only the speed does. A model that pads every text to its full context gains nothing from grouping:
    pass ``max_padding=1.0`` (batches of ``batch_size``).
    """
    out = torch.empty(len(ids), dim, device=device)
    for group in length_groups([len(x) for x in ids], batch_size, max_padding):
        out[to_device(torch.tensor(group), device)] = l2_normalize(encode_batch([ids[i] for i in group]))
    return out


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def batched(seq: Sequence, batch_size: int) -> Iterator[Sequence]:
    """Consecutive slices of at most ``batch_size`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(seq), batch_size):
        yield seq[start:start + batch_size]


def load_image(image: ImageInput) -> Image.Image:
    """Open an image (or pass one through) as RGB, with an error naming the file when it can't be read."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {image}") from None
    except Exception as exc:  # PIL raises several types for unreadable files
        raise ValueError(f"cannot read image {image}: {exc}") from exc


def weights_digest(module: torch.nn.Module, *extra: object) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, bytes) and any extra values."""
    h = hashlib.sha256()
    for value in extra:
        h.update(repr(value).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None picks CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; pass --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None: float16 on CUDA, float32 elsewhere; else ``fp32``/``fp16``/``bf16`` (or a torch dtype).

    >>> resolve_dtype("auto", torch.device("cpu")), resolve_dtype("bf16", torch.device("cpu"))
    (torch.float32, torch.bfloat16)
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, fp32, fp16 or bf16")
    return names[dtype]


def cast_model(retriever: Retriever, model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the encoder's weights for inference, after the fingerprint was taken on the weights as loaded.

    The fingerprint names the model, not the inference precision: an index built in float32 serves a
    float16 encoder of the same weights.
    """
    if dtype != torch.float32:
        _ = retriever.fingerprint
        model.to(dtype)


def warn_random_init(spec: str) -> None:
    """The loud warning for random-initialised weights."""
    msg = (f"RANDOM-INIT RETRIEVER {spec}: weights are random, embeddings carry NO semantics. "
           "Use only for tests and speed benchmarks; never train or evaluate with it.")
    logger.warning("!" * 20 + " " + msg + " " + "!" * 20)
