"""CVLUE image-text retrieval (Chinese captions of images chosen by native speakers), text -> image.

Where the layout comes from: the CVLUE repository (github.com/WangYuxuan93/CVLUE). The data itself is
released on request (CC BY-NC-ND 4.0), so the layout below is read from that repository's public
files, not from the data archive:

* ``test_example/IC/gold.json`` (the ITR answer key read by ``evaluation/eval_itr.py``) and
  ``cvlue_baseline/example/IC/example.json`` (a sample of the training set) are a JSON list of
  records ``{"image": "images/val/A/1-panda/A-1-34.png", "caption": ["...", ...]}``; training records
  also carry an integer ``"image_id"``. ``image`` is a path relative to an image root
  (the baselines' ``image_root``) and is also the id the official scorer and submissions use.
* The baselines' ``configs/.../ITR_ch.yaml`` name the annotation files ``IC/last_train.json``,
  ``IC/new_val.json`` and ``IC/new_test.json``.

Supported layout::

    <root>/<split>.json            # or <root>/IC/{last_train,new_val,new_test}.json, or ann_file=...
    <image_root>/<record["image"]> # image_root defaults to <root>

A record's ``caption`` may be a list of strings or one string (one caption per record, the
ALBEF-style training format); records naming the same image are merged into one corpus item.
Like the official scorer (``eval_itr.py``), identical caption strings are merged into one query whose
targets are every image that caption describes (``merge_duplicate_captions=False`` keeps one query
per caption occurrence). The hidden-label test release (``images.json``: a list of paths,
``captions.json``: a list of strings) carries no pairs and is not supported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .schema import (
    Benchmark,
    CorpusItem,
    DataFormatError,
    PathLike,
    Query,
    get_field,
    read_json,
    str_list,
)

BASELINE_ANN_FILES: dict[str, str] = {
    "train": "IC/last_train.json",
    "val": "IC/new_val.json",
    "test": "IC/new_test.json",
}
"""Annotation file names used by the CVLUE baselines' ITR configs, relative to the root."""


class CVLUE(Benchmark):
    """Chinese caption -> image retrieval on CVLUE's ITR task.

    Args:
        root: the CVLUE data folder.
        split: ``train``, ``val`` or ``test`` (any name works when ``ann_file`` is given).
        ann_file: the annotation JSON; default: the first that exists of ``<root>/<split>.json`` and
            ``<root>/`` + :data:`BASELINE_ANN_FILES` ``[split]``.
        image_root: the folder ``record["image"]`` paths are relative to; default ``root``.
        check_images: raise :class:`DataFormatError` when an image file is missing.
        merge_duplicate_captions: one query per distinct caption string (the official scorer's rule).
    """

    name = "cvlue"
    task = "multilingual"

    def __init__(
        self,
        root: PathLike,
        split: str = "val",
        *,
        ann_file: PathLike | None = None,
        image_root: PathLike | None = None,
        check_images: bool = True,
        merge_duplicate_captions: bool = True,
    ) -> None:
        super().__init__(root, split)
        self.ann_file = Path(ann_file) if ann_file is not None else self._default_ann_file()
        self.image_root = Path(image_root) if image_root is not None else self.root
        self.check_images = check_images
        self.merge_duplicate_captions = merge_duplicate_captions

    def _default_ann_file(self) -> Path:
        candidates = [self.root / f"{self.split}.json"]
        if self.split in BASELINE_ANN_FILES:
            candidates.append(self.root / BASELINE_ANN_FILES[self.split])
        for c in candidates:
            if c.is_file():
                return c
        raise DataFormatError(candidates[0], "missing CVLUE annotation file (also looked for "
                              + ", ".join(str(c) for c in candidates[1:]) + "); pass ann_file=...")

    def _records(self) -> Iterator[tuple[int, str, list[str]]]:
        """Yield ``(record_index, image, captions)`` with 1-based record indices."""
        path = self.ann_file
        data: Any = read_json(path)
        if not isinstance(data, list):
            raise DataFormatError(path, f"expected a JSON list of records, got {type(data).__name__}")
        for index, rec in enumerate(data, start=1):
            if not isinstance(rec, dict):
                raise DataFormatError(path, f"expected an object, got {type(rec).__name__}", record=index)
            image = get_field(rec, "image", str, path, record=index)
            if not image:
                raise DataFormatError(path, "empty 'image'", record=index)
            captions = str_list(get_field(rec, "caption", (list, str), path, record=index), "'caption'", path,
                                record=index)
            for c in captions:
                if not c.strip():
                    raise DataFormatError(path, f"empty caption for image {image!r}", record=index)
            yield index, image, captions

    def corpus(self) -> Iterator[CorpusItem]:
        """Yield each distinct image once, in order of first appearance."""
        seen: set[str] = set()
        for index, image, _ in self._records():
            if image in seen:
                continue
            seen.add(image)
            path = self.image_root / image
            if self.check_images and not path.is_file():
                raise DataFormatError(self.ann_file, f"image file {path} does not exist", record=index)
            yield CorpusItem(id=image, image=str(path))

    def queries(self) -> Iterator[Query]:
        """Yield caption queries; ids are ``<record>-<caption>`` (1-based) of the first occurrence."""
        if not self.merge_duplicate_captions:
            for index, image, captions in self._records():
                for j, caption in enumerate(captions, start=1):
                    yield self._query(f"{index}-{j}", caption, (image,))
            return
        order: list[tuple[str, str]] = []  # (query_id, caption) in order of first appearance
        targets: dict[str, list[str]] = {}
        for index, image, captions in self._records():
            for j, caption in enumerate(captions, start=1):
                if caption not in targets:
                    targets[caption] = []
                    order.append((f"{index}-{j}", caption))
                if image not in targets[caption]:
                    targets[caption].append(image)
        for query_id, caption in order:
            yield self._query(query_id, caption, tuple(targets[caption]))

    def _query(self, query_id: str, caption: str, targets: tuple[str, ...]) -> Query:
        return Query(query_id=query_id, text=caption, target_ids=targets, language="zh", split=self.split,
                     task="multilingual")
