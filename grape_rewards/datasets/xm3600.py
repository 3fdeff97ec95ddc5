"""Crossmodal-3600 (XM3600): 3,600 images with human captions in 36 languages; caption -> image.

Layout of Google's release (google.github.io/crossmodal-3600: ``captions.zip`` holds ``captions.jsonl``;
``images.tgz`` unpacks to ``images/<image key>.jpg``)::

    <root>/captions.jsonl
    <root>/images/<image/key>.jpg

Each line of ``captions.jsonl`` is one image::

    {"image/key": "000411001ff7dd4f", "image/locale": "...",
     "ar": {"caption": [...], "caption/tokenized": [...], "caption/tokenized/lowercase": [...]},
     ..., "zh": {...}}

The layout was checked against the release page and against public loaders of the file (HELM's
``Crossmodal3600Scenario``, SEACrowd's ``xm3600`` script). XM3600 is a test-only set: ``split`` must be
``test``. The corpus is all 3,600 images; each caption of the chosen language is one query whose only
target is its image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .schema import Benchmark, CorpusItem, DataFormatError, PathLike, Query, get_field, read_jsonl, str_list

LANGUAGES: tuple[str, ...] = (
    "ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr", "he", "hi", "hr", "hu", "id", "it",
    "ja", "ko", "mi", "nl", "no", "pl", "pt", "quz", "ro", "ru", "sv", "sw", "te", "th", "tr", "uk", "vi", "zh",
)
"""The 36 caption languages of XM3600."""

CAPTION_FIELDS: tuple[str, ...] = ("caption", "caption/tokenized", "caption/tokenized/lowercase")


class XM3600(Benchmark):
    """XM3600 caption -> image retrieval in one language.

    Args:
        root: folder holding ``captions.jsonl`` and ``images/``.
        split: must be ``test`` (the only split).
        language: one of :data:`LANGUAGES`, e.g. ``"zh"`` or ``"en"``.
        caption_field: which caption variant to use (raw ``caption`` by default).
        image_dir: where ``<key>.jpg`` files are; default ``<root>/images``.
        check_images: raise :class:`DataFormatError` when an image file is missing.
    """

    name = "xm3600"
    task = "multilingual"

    def __init__(
        self,
        root: PathLike,
        split: str = "test",
        *,
        language: str = "zh",
        caption_field: str = "caption",
        image_dir: PathLike | None = None,
        check_images: bool = True,
    ) -> None:
        if split != "test":
            raise ValueError(f"XM3600 has only a 'test' split, got {split!r}")
        if language not in LANGUAGES:
            raise ValueError(f"unknown XM3600 language {language!r}; expected one of {LANGUAGES}")
        if caption_field not in CAPTION_FIELDS:
            raise ValueError(f"unknown caption field {caption_field!r}; expected one of {CAPTION_FIELDS}")
        super().__init__(root, split)
        self.language = language
        self.caption_field = caption_field
        self.captions_jsonl = self.root / "captions.jsonl"
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / "images"
        self.check_images = check_images

    def _records(self) -> Iterator[tuple[int, str, list[str]]]:
        """Yield ``(line_number, image_key, captions_in_language)``; image keys must be unique."""
        path = self.captions_jsonl
        seen: set[str] = set()
        for line_no, obj in read_jsonl(path):
            key = get_field(obj, "image/key", str, path, line=line_no)
            if not key or "/" in key or key in (".", ".."):
                raise DataFormatError(path, f"bad image/key {key!r}", line=line_no)
            if key in seen:
                raise DataFormatError(path, f"duplicate image/key {key!r}", line=line_no)
            seen.add(key)
            entry = get_field(obj, self.language, dict, path, line=line_no)
            captions = str_list(get_field(entry, self.caption_field, list, path, line=line_no),
                                f"{self.language}/{self.caption_field}", path, line=line_no)
            yield line_no, key, captions

    def corpus(self) -> Iterator[CorpusItem]:
        """Yield one item per line of ``captions.jsonl``: the image ``images/<key>.jpg``."""
        for line_no, key, _ in self._records():
            path = self.image_dir / f"{key}.jpg"
            if self.check_images and not path.is_file():
                raise DataFormatError(self.captions_jsonl, f"image file {path} does not exist", line=line_no)
            yield CorpusItem(id=key, image=str(path))

    def queries(self) -> Iterator[Query]:
        """Yield one query per caption; ids are ``<key>/<language>/<index>`` (0-based index)."""
        for line_no, key, captions in self._records():
            for i, caption in enumerate(captions):
                if not caption.strip():
                    raise DataFormatError(self.captions_jsonl, f"empty {self.language} caption {i} of {key!r}",
                                          line=line_no)
                yield Query(query_id=f"{key}/{self.language}/{i}", text=caption, target_ids=(key,),
                            language=self.language, split=self.split, task="multilingual")
