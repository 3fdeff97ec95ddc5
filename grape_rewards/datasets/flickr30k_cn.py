"""Flickr30k-CN (Chinese captions of Flickr30k images), in the Chinese-CLIP release layout.

Layout (Chinese-CLIP README, "Data Preprocessing"; the Flickr30k-CN files Chinese-CLIP distributes)::

    <root>/
        <split>_imgs.tsv      # one image per line: "<image_id>\\t<base64 of the image file>"
        <split>_texts.jsonl   # one text per line: {"text_id": 8428, "text": "...", "image_ids": [1076345]}

``split`` is ``train``, ``valid`` or ``test``. Ids are JSON integers (strings are accepted too); a text
whose pairing is unknown has ``"image_ids": []`` and becomes a query with no targets.

Corpus items need image files, so the base64 images are extracted once into
``<root>/images/<split>/<image_id>.jpg`` (or ``image_dir``): each file is written under a temporary
name and moved into place with :func:`os.replace`, and files that already exist are skipped, so an
interrupted extraction resumes where it stopped. :meth:`Flickr30kCN.corpus` extracts as it streams;
:meth:`Flickr30kCN.extract_images` does it all up front. The bytes are written as decoded, never
re-encoded (the ``.jpg`` suffix names the usual content; PIL opens by content, not suffix).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from .schema import (
    Benchmark,
    CorpusItem,
    DataFormatError,
    PathLike,
    Query,
    as_id,
    get_field,
    read_jsonl,
    require_file,
)

SPLITS: tuple[str, ...] = ("train", "valid", "test")


class Flickr30kCN(Benchmark):
    """Chinese caption -> image retrieval over one split's images.

    Args:
        root: the folder holding ``<split>_imgs.tsv`` and ``<split>_texts.jsonl``.
        split: ``train``, ``valid`` or ``test``.
        image_dir: where extracted images go; default ``<root>/images/<split>``.
        extension: file suffix of extracted images.
        validate_targets: check that every ``image_ids`` entry is an image of the split's TSV
            (reads the TSV's id column once and caches it).
        progress: show a tqdm bar while images are extracted.
    """

    name = "flickr30k-cn"
    task = "multilingual"

    def __init__(
        self,
        root: PathLike,
        split: str = "test",
        *,
        image_dir: PathLike | None = None,
        extension: str = ".jpg",
        validate_targets: bool = True,
        progress: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown Flickr30k-CN split {split!r}; expected one of {SPLITS}")
        super().__init__(root, split)
        self.images_tsv = self.root / f"{split}_imgs.tsv"
        self.texts_jsonl = self.root / f"{split}_texts.jsonl"
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / "images" / split
        self.extension = extension
        self.validate_targets = validate_targets
        self.progress = progress
        self._image_ids: frozenset[str] | None = None

    def image_path(self, image_id: str) -> Path:
        """Where the image with this id is (or will be) extracted."""
        return self.image_dir / f"{image_id}{self.extension}"

    def _tsv_rows(self) -> Iterator[tuple[int, str, str]]:
        """Yield ``(line_number, image_id, base64)`` for each line of the images TSV."""
        require_file(self.images_tsv, "images TSV")
        with open(self.images_tsv, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    raise DataFormatError(self.images_tsv, f"expected 2 tab-separated columns (image_id, base64), "
                                          f"got {len(parts)}", line=line_no)
                image_id, b64 = parts[0].strip(), parts[1].strip()
                if not image_id or image_id in (".", "..") or any(c.isspace() or c in "/\\" for c in image_id):
                    raise DataFormatError(self.images_tsv, f"bad image id {parts[0]!r}", line=line_no)
                if not b64:
                    raise DataFormatError(self.images_tsv, f"image {image_id} has an empty base64 column", line=line_no)
                yield line_no, image_id, b64

    def image_ids(self) -> frozenset[str]:
        """The ids of the split's images (read from the TSV's first column once, then cached)."""
        if self._image_ids is None:
            ids: set[str] = set()
            for line_no, image_id, _ in self._tsv_rows():
                if image_id in ids:
                    raise DataFormatError(self.images_tsv, f"duplicate image id {image_id}", line=line_no)
                ids.add(image_id)
            self._image_ids = frozenset(ids)
        return self._image_ids

    def _write_image(self, path: Path, b64: str, line_no: int) -> None:
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataFormatError(self.images_tsv, f"invalid base64 image data ({e})", line=line_no) from None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def corpus(self) -> Iterator[CorpusItem]:
        """Yield one item per TSV line, extracting its image first if the file is not there yet."""
        self.image_dir.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        bar = tqdm(desc=f"Flickr30k-CN {self.split} images", unit="img", disable=not self.progress)
        try:
            for line_no, image_id, b64 in self._tsv_rows():
                if image_id in seen:
                    raise DataFormatError(self.images_tsv, f"duplicate image id {image_id}", line=line_no)
                seen.add(image_id)
                path = self.image_path(image_id)
                if not path.exists():
                    self._write_image(path, b64, line_no)
                bar.update(1)
                yield CorpusItem(id=image_id, image=str(path))
        finally:
            bar.close()
        self._image_ids = frozenset(seen)

    def extract_images(self) -> int:
        """Extract every image not yet on disk; return the number of corpus images."""
        return sum(1 for _ in self.corpus())

    def queries(self) -> Iterator[Query]:
        """Yield one query per text line; its targets are the line's ``image_ids``."""
        known = self.image_ids() if self.validate_targets else None
        seen: set[str] = set()
        path = self.texts_jsonl
        for line_no, obj in read_jsonl(path):
            text_id = as_id(get_field(obj, "text_id", (int, str), path, line=line_no), "text_id", path, line=line_no)
            text = get_field(obj, "text", str, path, line=line_no)
            if not text.strip():
                raise DataFormatError(path, f"text {text_id} is empty", line=line_no)
            raw_targets = get_field(obj, "image_ids", list, path, line=line_no)
            targets = tuple(as_id(t, "image_ids entry", path, line=line_no) for t in raw_targets)
            if text_id in seen:
                raise DataFormatError(path, f"duplicate text_id {text_id}", line=line_no)
            seen.add(text_id)
            if known is not None:
                for t in targets:
                    if t not in known:
                        raise DataFormatError(path, f"image id {t} is not in {self.images_tsv.name}", line=line_no)
            yield Query(query_id=text_id, text=text, target_ids=targets, language="zh", split=self.split,
                        task="multilingual")
