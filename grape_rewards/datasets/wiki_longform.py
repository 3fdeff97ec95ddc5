"""Wikipedia long-form text -> image retrieval: a long Wikipedia passage must retrieve its image.

Two layouts are supported; the examples and tests use the first.

1. ``format="jsonl"`` (default): ``<root>/<split>.jsonl``, one pair per line::

       {"id": "q0001", "image": "images/abc.jpg", "text": "<long passage>"}

   ``image`` is a path relative to ``image_dir`` (default ``root``), or absolute. The corpus is the
   distinct ``image`` values (each is its item's id); every line is a query targeting its image.

2. ``format="wit"``: the TSV files of Google's WIT release (github.com/google-research-datasets/wit,
   ``DATA.md``: ``wit_v1.train.all-0000N-of-00010.tsv.gz``, plain or gzip-compressed, with a header
   row) whose 17 columns are, in order: ``language, page_url, image_url, page_title, section_title,
   hierarchical_section_title, caption_reference_description, caption_attribution_description,
   caption_alt_text_description, mime_type, original_height, original_width, is_main_image,
   attribution_passes_lang_id, page_changed_recently, context_page_description,
   context_section_description``. WIT ships URLs, not images: the images must already be downloaded
   into ``image_dir``, named by ``image_naming``:

   * ``"sha1"`` (default): ``sha1(image_url as UTF-8).hexdigest()`` + the URL's lower-cased file
     extension, e.g. ``3f1c...9a.jpg``;
   * ``"basename"``: the URL's last path component, percent-decoded, e.g. ``Eiffel_Tower.jpg``.

   The query text is the first non-empty column of ``text_fields`` (default: the section's context,
   then the page's). Rows with no such text, another ``language`` (when one is given), or no
   downloaded image are skipped (``skip_missing_images=False`` raises instead). The corpus is the
   distinct image URLs (each is its item's id); query ids are ``<file name>:<line>``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

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

WIT_COLUMNS: tuple[str, ...] = (
    "language", "page_url", "image_url", "page_title", "section_title", "hierarchical_section_title",
    "caption_reference_description", "caption_attribution_description", "caption_alt_text_description",
    "mime_type", "original_height", "original_width", "is_main_image", "attribution_passes_lang_id",
    "page_changed_recently", "context_page_description", "context_section_description",
)
"""The 17 columns of a WIT TSV file, in release order."""

DEFAULT_TEXT_FIELDS: tuple[str, ...] = ("context_section_description", "context_page_description")

_CSV_FIELD_LIMIT = 1 << 26  # Wikipedia sections can exceed csv's default 128 KiB field limit


def wit_image_filename(image_url: str, naming: Literal["sha1", "basename"] = "sha1") -> str:
    """The file name under which the image of ``image_url`` is expected (see the module docstring).

    >>> wit_image_filename("https://upload.wikimedia.org/wikipedia/commons/a/ab/Eiffel%20Tower.JPG", "basename")
    'Eiffel Tower.JPG'
    >>> wit_image_filename("https://upload.wikimedia.org/x/Foo.JPG")[-4:]
    '.jpg'
    """
    url_path = urlparse(image_url).path
    basename = unquote(url_path.rsplit("/", 1)[-1])
    if naming == "basename":
        return basename
    if naming == "sha1":
        suffix = Path(basename).suffix.lower()
        return hashlib.sha1(image_url.encode("utf-8")).hexdigest() + suffix
    raise ValueError(f"unknown image naming {naming!r}; expected 'sha1' or 'basename'")


class WikiLongform(Benchmark):
    """Long Wikipedia passage -> image retrieval.

    Args:
        root: the data folder.
        split: names ``<root>/<split>.jsonl`` in ``jsonl`` format; unused for ``wit``.
        format: ``"jsonl"`` or ``"wit"``.
        image_dir: images folder; default ``root``.
        tsv_files: WIT files to read; default every ``*.tsv`` / ``*.tsv.gz`` under ``root``, sorted.
        image_naming: ``"sha1"`` or ``"basename"`` (WIT only).
        text_fields: WIT columns to take the query text from, first non-empty wins.
        language: keep only WIT rows of this language (e.g. ``"en"``); ``None`` keeps all.
        skip_missing_images: WIT only; skip rows whose image is not downloaded instead of raising.
        check_images: ``jsonl`` only; raise when an image file is missing.
    """

    name = "wiki-longform"
    task = "longform"

    def __init__(
        self,
        root: PathLike,
        split: str = "test",
        *,
        format: Literal["jsonl", "wit"] = "jsonl",
        image_dir: PathLike | None = None,
        tsv_files: Sequence[PathLike] | None = None,
        image_naming: Literal["sha1", "basename"] = "sha1",
        text_fields: Sequence[str] = DEFAULT_TEXT_FIELDS,
        language: str | None = None,
        skip_missing_images: bool = True,
        check_images: bool = True,
    ) -> None:
        if format not in ("jsonl", "wit"):
            raise ValueError(f"unknown format {format!r}; expected 'jsonl' or 'wit'")
        if image_naming not in ("sha1", "basename"):
            raise ValueError(f"unknown image naming {image_naming!r}; expected 'sha1' or 'basename'")
        unknown = [f for f in text_fields if f not in WIT_COLUMNS]
        if unknown or not text_fields:
            raise ValueError(f"text_fields must be non-empty WIT columns; unknown: {unknown}")
        super().__init__(root, split)
        self.format = format
        self.image_dir = Path(image_dir) if image_dir is not None else self.root
        self.jsonl_file = self.root / f"{split}.jsonl"
        self._tsv_files = [Path(p) for p in tsv_files] if tsv_files is not None else None
        self.image_naming = image_naming
        self.text_fields = tuple(text_fields)
        self.language = language
        self.skip_missing_images = skip_missing_images
        self.check_images = check_images

    # ------------------------------------------------------------------ dispatch

    def corpus(self) -> Iterator[CorpusItem]:
        """Yield each distinct image once, in order of first appearance."""
        seen: set[str] = set()
        for item, _ in self._pairs():
            if item.id not in seen:
                seen.add(item.id)
                yield item

    def queries(self) -> Iterator[Query]:
        """Yield one query per pair (JSONL line or kept WIT row)."""
        for _, query in self._pairs():
            yield query

    def _pairs(self) -> Iterator[tuple[CorpusItem, Query]]:
        return self._jsonl_pairs() if self.format == "jsonl" else self._wit_pairs()

    # ------------------------------------------------------------------ JSONL

    def _jsonl_pairs(self) -> Iterator[tuple[CorpusItem, Query]]:
        path = self.jsonl_file
        seen: set[str] = set()
        for line_no, obj in read_jsonl(path):
            query_id = as_id(get_field(obj, "id", (str, int), path, line=line_no), "id", path, line=line_no)
            image = get_field(obj, "image", str, path, line=line_no)
            text = get_field(obj, "text", str, path, line=line_no)
            if not image:
                raise DataFormatError(path, "empty 'image'", line=line_no)
            if not text.strip():
                raise DataFormatError(path, f"empty text for id {query_id!r}", line=line_no)
            if query_id in seen:
                raise DataFormatError(path, f"duplicate id {query_id!r}", line=line_no)
            seen.add(query_id)
            image_path = self.image_dir / image
            if self.check_images and not image_path.is_file():
                raise DataFormatError(path, f"image file {image_path} does not exist", line=line_no)
            yield (CorpusItem(id=image, image=str(image_path)),
                   Query(query_id=query_id, text=text, target_ids=(image,), split=self.split, task="longform"))

    # ------------------------------------------------------------------ WIT TSV

    def tsv_files(self) -> list[Path]:
        """The WIT files read, in order."""
        if self._tsv_files is not None:
            return list(self._tsv_files)
        files = sorted(p for p in self.root.iterdir() if p.name.endswith((".tsv", ".tsv.gz")))
        if not files:
            raise DataFormatError(self.root, "no WIT *.tsv or *.tsv.gz files in this folder")
        return files

    def _wit_pairs(self) -> Iterator[tuple[CorpusItem, Query]]:
        # The limit is process-wide; it is only ever raised (restoring it could break another reader).
        if csv.field_size_limit() < _CSV_FIELD_LIMIT:
            csv.field_size_limit(_CSV_FIELD_LIMIT)
        for path in self.tsv_files():
            yield from self._wit_file_pairs(path)

    def _wit_file_pairs(self, path: Path) -> Iterator[tuple[CorpusItem, Query]]:
        require_file(path, "WIT TSV")
        raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
        with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            try:
                header = next(reader)
            except StopIteration:
                raise DataFormatError(path, "empty file: expected a header row", line=1) from None
            except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
                raise DataFormatError(path, f"unreadable header ({e})", line=1) from None
            missing = [c for c in ("language", "image_url", *self.text_fields) if c not in header]
            if missing:
                raise DataFormatError(path, f"header lacks WIT columns {missing}", line=1)
            col = {name: i for i, name in enumerate(header)}
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
                    raise DataFormatError(path, f"unreadable row ({e})", line=reader.line_num) from None
                line_no = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataFormatError(path, f"expected {len(header)} columns, got {len(row)}", line=line_no)
                if self.language is not None and row[col["language"]] != self.language:
                    continue
                text = next((row[col[f]] for f in self.text_fields if row[col[f]].strip()), "")
                if not text:
                    continue
                url = row[col["image_url"]]
                if not url:
                    raise DataFormatError(path, "empty image_url", line=line_no)
                image_path = self.image_dir / wit_image_filename(url, self.image_naming)
                if not image_path.is_file():
                    if self.skip_missing_images:
                        continue
                    raise DataFormatError(path, f"image file {image_path} for {url} does not exist", line=line_no)
                yield (CorpusItem(id=url, image=str(image_path)),
                       Query(query_id=f"{path.name}:{line_no}", text=text, target_ids=(url,),
                             language=row[col["language"]] or None, split=self.split, task="longform"))
