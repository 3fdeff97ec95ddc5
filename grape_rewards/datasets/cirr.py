"""CIRR (Composed Image Retrieval on Real-life images): reference image + modification text -> target image.

Layout of the official release (github.com/Cuberick-Orion/CIRR, README "Dataset File Structure";
annotations from the ``cirr_dataset`` branch, raw images from NLVR2)::

    <root>/captions/cap.rc2.<split>.json        # list of query records (below)
    <root>/image_splits/split.rc2.<split>.json  # {"dev-0-0-img0": "./dev/dev-0-0-img0.png", ...}
    <root>/img_raw/train/<n>/<name>.png, img_raw/dev/<name>.png, img_raw/test1/<name>.png

``split`` is ``train``, ``val`` or ``test1`` (``test`` is accepted for ``test1``; note the val
images live in ``dev/``). Image paths are the split file's relative paths joined to ``image_root``
(default ``<root>/img_raw``; pass the folder that holds ``train/``, ``dev/`` and ``test1/``).

A caption record::

    {"pairid": 12063, "reference": "test1-147-1-img1", "target_hard": "test1-83-0-img1",
     "target_soft": {"test1-83-0-img1": 1.0}, "caption": "remove all but one dog and add a woman hugging it",
     "img_set": {"id": 1, "members": ["test1-147-1-img1", ...], "reference_rank": 3, "target_rank": 4}}

Mapping to the common schema, following the CIRR protocol:

* corpus: EVERY image of the split file (the full gallery), not only the images queries mention;
* ``query_id`` = ``str(pairid)``; ``text`` = ``caption``; ``reference_id`` = ``reference``, which must be
  excluded from the query's ranking;
* ``target_ids`` = ``(target_hard,)``; ``subset_ids`` = ``img_set.members`` minus the reference (the
  Recall_subset candidates, in file order).

The test split's labels are hidden: its records have no ``target_hard``, so its queries have
``target_ids == ()``. Evaluation on ``test1`` can only write submission files for the CIRR server
(:func:`grape_rewards.eval.write_cirr_submissions`), not compute recall.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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

SPLITS: tuple[str, ...] = ("train", "val", "test1")
_ALIASES = {"test": "test1"}


class CIRR(Benchmark):
    """CIRR composed image retrieval on one split.

    Args:
        root: the annotation folder (holding ``captions/`` and ``image_splits/``).
        split: ``train``, ``val`` or ``test1`` (alias ``test``).
        image_root: the folder the split file's ``./dev/...`` paths are relative to; default ``<root>/img_raw``.
        version: annotation version in the file names.
        check_images: raise :class:`DataFormatError` when an image file is missing.
    """

    name = "cirr"
    task = "composed"

    def __init__(
        self,
        root: PathLike,
        split: str = "val",
        *,
        image_root: PathLike | None = None,
        version: str = "rc2",
        check_images: bool = True,
    ) -> None:
        split = _ALIASES.get(split, split)
        if split not in SPLITS:
            raise ValueError(f"unknown CIRR split {split!r}; expected one of {SPLITS} (or 'test')")
        super().__init__(root, split)
        self.version = version
        self.captions_file = self.root / "captions" / f"cap.{version}.{split}.json"
        self.split_file = self.root / "image_splits" / f"split.{version}.{split}.json"
        self.image_root = Path(image_root) if image_root is not None else self.root / "img_raw"
        self.check_images = check_images
        self._images: dict[str, str] | None = None

    @property
    def has_labels(self) -> bool:
        """False for the test split, whose targets are hidden."""
        return self.split != "test1"

    def images(self) -> dict[str, str]:
        """The split file: image name -> path relative to ``image_root`` (loaded once, then cached)."""
        if self._images is None:
            path = self.split_file
            data = read_json(path)
            if not isinstance(data, dict):
                raise DataFormatError(path, f"expected a JSON object of image name -> path, got {type(data).__name__}")
            for index, (name, rel) in enumerate(data.items(), start=1):
                if not name or not isinstance(rel, str) or not rel:
                    raise DataFormatError(path, f"image {name!r} must map to a non-empty relative path string",
                                          record=index)
            self._images = data
        return self._images

    def image_path(self, name: str) -> Path:
        """Absolute path of the image called ``name``."""
        rel = self.images()[name]
        return self.image_root / (rel[2:] if rel.startswith("./") else rel)

    def corpus(self) -> Iterator[CorpusItem]:
        """Yield every image of the split (the whole gallery), in split-file order."""
        for index, name in enumerate(self.images(), start=1):
            path = self.image_path(name)
            if self.check_images and not path.is_file():
                raise DataFormatError(self.split_file, f"image file {path} does not exist", record=index)
            yield CorpusItem(id=name, image=str(path))

    def queries(self) -> Iterator[Query]:
        """Yield one composed query per caption record."""
        path = self.captions_file
        data = read_json(path)
        if not isinstance(data, list):
            raise DataFormatError(path, f"expected a JSON list of records, got {type(data).__name__}")
        gallery = self.images()
        seen: set[str] = set()
        for index, rec in enumerate(data, start=1):
            if not isinstance(rec, dict):
                raise DataFormatError(path, f"expected an object, got {type(rec).__name__}", record=index)
            pairid = get_field(rec, "pairid", int, path, record=index)
            reference = get_field(rec, "reference", str, path, record=index)
            caption = get_field(rec, "caption", str, path, record=index)
            img_set = get_field(rec, "img_set", dict, path, record=index)
            members = str_list(get_field(img_set, "members", list, path, record=index), "img_set.members", path,
                               record=index)
            if self.has_labels:
                targets: tuple[str, ...] = (get_field(rec, "target_hard", str, path, record=index),)
            else:
                targets = ()
            query_id = str(pairid)
            if query_id in seen:
                raise DataFormatError(path, f"duplicate pairid {pairid}", record=index)
            seen.add(query_id)
            for what, name in [("reference", reference), *(("target_hard", t) for t in targets),
                               *(("img_set member", m) for m in members)]:
                if name not in gallery:
                    raise DataFormatError(path, f"{what} {name!r} is not in {self.split_file.name}", record=index)
            yield Query(
                query_id=query_id,
                text=caption,
                target_ids=targets,
                reference_id=reference,
                subset_ids=tuple(m for m in members if m != reference),
                language="en",
                split=self.split,
                task="composed",
            )
