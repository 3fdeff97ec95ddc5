"""Where corpus items come from: an image folder, or a JSONL/CSV manifest of (id, image path) or (id, text), a
text optionally with a title."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..jsonl import jsonl_objects
from .contents import item_contents

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class CorpusSourceError(ValueError):
    """A corpus source that cannot be indexed; the message names the file, line and problem."""


@dataclass
class CorpusSource:
    """The items of a corpus, in order: ids and, per id, an image path or a text."""

    ids: list[str]
    items: list[str]
    modality: Literal["image", "text"]
    origin: str = ""
    """Where the items came from (for the manifest)."""
    titles: list[str | None] | None = None
    """Text corpora: each item's title (None: it has none), or None when no item has one. A title is not embedded:
    it heads the item's contents, Search-R1's passage (:func:`~grape_rewards.corpus.contents.item_contents`)."""
    _digest: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.items):
            raise CorpusSourceError(f"{self.origin}: {len(self.ids)} ids for {len(self.items)} items")
        if self.titles is not None and (len(self.titles) != len(self.ids) or self.modality != "text"):
            raise CorpusSourceError(f"{self.origin}: titles are for text corpora, one per item (got "
                                    f"{len(self.titles)} for {len(self.ids)} {self.modality} items)")
        if not self.ids:
            raise CorpusSourceError(f"{self.origin or 'corpus source'}: no items")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def digest(self) -> str:
        """SHA-256 of the ids and items (and titles, when there are any), in order: what a resumed build checks it
        is resuming."""
        if self._digest is None:
            h = hashlib.sha256(self.modality.encode())
            for i, item in zip(self.ids, self.items):
                h.update(json.dumps([i, item], ensure_ascii=False).encode())
            if self.titles is not None:
                h.update(json.dumps(self.titles, ensure_ascii=False).encode())
            self._digest = h.hexdigest()
        return self._digest

    def contents(self) -> Iterator[str] | None:
        """Each item's contents in order (its text, headed by its title when it has one) for a text corpus; None
        for images."""
        if self.modality != "text":
            return None
        titles = self.titles or itertools.repeat(None)
        return (item_contents(text, title) for text, title in zip(self.items, titles))

    @classmethod
    def from_records(cls, records: Iterable[tuple[str, str]], modality: Literal["image", "text"],
                     origin: str = "records") -> CorpusSource:
        """From (id, image path or text) pairs, checked like a manifest."""
        ids, items, seen = [], [], {}
        for n, (item_id, payload) in enumerate(records, start=1):
            _check_record(str(item_id), payload, modality, seen, f"{origin}: record {n}")
            seen[str(item_id)] = n
            ids.append(str(item_id))
            items.append(payload)
        return cls(ids, items, modality, origin)


def _check_record(item_id: str, payload: str, modality: str, seen: dict[str, int], where: str) -> None:
    if not item_id:
        raise CorpusSourceError(f"{where}: empty id")
    if item_id in seen:
        raise CorpusSourceError(f"{where}: duplicate id {item_id!r} (first seen at {seen[item_id]})")
    if not isinstance(payload, str) or not payload.strip():
        raise CorpusSourceError(f"{where}: id {item_id!r} has an empty {modality}")
    if modality == "image" and not Path(payload).is_file():
        raise CorpusSourceError(f"{where}: image file of id {item_id!r} not found: {payload}")


def read_image_folder(folder: str | Path) -> CorpusSource:
    """Every image file under ``folder`` (recursively, sorted); the id is the file name without extension."""
    root = Path(folder)
    if not root.is_dir():
        raise CorpusSourceError(f"image folder {root}: no such folder; pass a folder of image files "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
    ids, items, seen = [], [], {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        item_id = path.stem
        if item_id in seen:
            raise CorpusSourceError(f"{root}: two images share the id {item_id!r}: {seen[item_id]} and {path}; "
                                    "use a JSONL or CSV manifest to give them distinct ids")
        seen[item_id] = path
        ids.append(item_id)
        items.append(str(path))
    if not ids:
        raise CorpusSourceError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return CorpusSource(ids, items, "image", str(root))


def _record_fields(record: dict, where: str) -> tuple[str, str, Literal["image", "text"], str | None]:
    """(id, image path or text, modality, title or None) of a manifest record."""
    if "id" not in record:
        raise CorpusSourceError(f"{where}: missing field 'id'")
    has_image, has_text = record.get("image") not in (None, ""), record.get("text") not in (None, "")
    if has_image == has_text:
        raise CorpusSourceError(f"{where}: expected exactly one of the fields 'image' (a path) or 'text'")
    title = record.get("title")
    title = None if title in (None, "") else str(title)
    if has_image:
        if title is not None:
            raise CorpusSourceError(f"{where}: 'title' is read for text items only; drop it from image items")
        return str(record["id"]), str(record["image"]), "image", None
    return str(record["id"]), str(record["text"]), "text", title


def read_source_manifest(path: str | Path) -> CorpusSource:
    """A JSONL (``{"id": ..., "image": path}`` or ``{"id": ..., "text": ...}`` per line) or CSV (header
    ``id,image`` or ``id,text``) manifest. Relative image paths are read from the manifest's folder. A text item
    may carry a ``title`` (a field, or a CSV column): it is not embedded, it heads the item's contents."""
    path = Path(path)
    if not path.is_file():
        raise CorpusSourceError(f"source manifest {path}: no such file; pass a JSONL or CSV manifest "
                                "(one item per line or row: an id and an image path or a text)")
    ids: list[str] = []
    items: list[str] = []
    titles: list[str | None] = []
    seen: dict[str, int] = {}
    modality: str | None = None
    for line_no, record in _manifest_records(path):
        where = f"{path}:{line_no}"
        item_id, payload, kind, title = _record_fields(record, where)
        if modality is None:
            modality = kind
        elif kind != modality:
            raise CorpusSourceError(f"{where}: {kind} item in a corpus of {modality} items")
        if kind == "image" and not Path(payload).is_absolute():
            payload = str(path.parent / payload)
        _check_record(item_id, payload, kind, seen, where)
        seen[item_id] = line_no
        ids.append(item_id)
        items.append(payload)
        titles.append(title)
    if modality is None:
        raise CorpusSourceError(f"manifest {path} holds no items")
    has_titles = any(t is not None for t in titles)
    return CorpusSource(ids, items, modality, str(path), titles if has_titles else None)  # type: ignore[arg-type]


def _manifest_records(path: Path) -> Iterable[tuple[int, dict]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "id" not in reader.fieldnames:
                raise CorpusSourceError(f"{path}:1: the CSV header must name an 'id' column and 'image' or 'text'")
            yield from enumerate(reader, start=2)
        return
    with path.open(encoding="utf-8") as f:
        yield from jsonl_objects(f, lambda n, problem: CorpusSourceError(f"{path}:{n}: {problem}"))


def read_source(path: str | Path) -> CorpusSource:
    """An image folder, or a ``.jsonl`` / ``.json`` / ``.csv`` manifest."""
    p = Path(path)
    if not p.exists():
        raise CorpusSourceError(f"corpus source {p}: no such file or folder; pass a folder of images, a JSONL/CSV "
                                "of texts, or a source manifest (JSONL/CSV of ids with image paths or texts)")
    return read_image_folder(p) if p.is_dir() else read_source_manifest(p)
