"""An embedded corpus on disk and in memory: float16 embeddings, ids, and a manifest.

Layout of an index folder::

    manifest.json            format, retriever spec + fingerprint, dim, count, dtype, checksums, created_at
    embeddings.safetensors   {"embeddings": (count, dim) float16}
    ids.json                 ["id0", "id1", ...]
    contents.bin                   text corpora: the items' texts, one after the other (:mod:`.contents`)
    contents-offsets.safetensors   text corpora: {"offsets": (count + 1,) int64}, where each item's text starts

The contents files are optional: an index holds them when its manifest's checksums name them (text corpora built
by this version, and their shards); image corpora and indexes built before them have none, and their items'
contents are their ids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..devices import to_device
from .contents import CONTENT_FILES, CONTENTS, ContentsError, ContentStore
from .files import sha256_file
from .rank import DEFAULT_CHUNK_ELEMENTS, NO_EXTRAS, RankStats, ScanExtras, column_sums, corpus_rank, max_row_norm

INDEX_FORMAT = "grape-rewards-index"
INDEX_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
IDS = "ids.json"


class CorpusIndexError(RuntimeError):
    """An index folder that cannot be used as asked; the message says why and what to do."""


class UnknownIdError(KeyError):
    """An id that is not in the corpus (the training data names an item the index does not hold)."""

    def __init__(self, item_id: str, index_name: str = "the corpus") -> None:
        super().__init__(item_id)
        self.item_id = item_id
        self.message = f"unknown corpus id {item_id!r}: not in {index_name}"

    def __str__(self) -> str:
        return self.message


def lookup_rows(row_of: dict[str, int], ids: Sequence[str], index_name: str) -> list[int]:
    """Rows of ``ids`` in an id -> row map; an unknown id raises :class:`UnknownIdError` naming it."""
    out = []
    for item_id in ids:
        row = row_of.get(str(item_id))
        if row is None:
            raise UnknownIdError(str(item_id), index_name)
        out.append(row)
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, with a clear error when it is not one."""
    folder = Path(path)
    manifest_file = folder / MANIFEST
    if folder.is_file():
        what = "the manifest file itself" if folder.name == MANIFEST else "a file"
        raise CorpusIndexError(f"index {folder}: expected the index folder (the one holding {MANIFEST}), got {what}; "
                               f"pass its folder{f' ({folder.parent})' if folder.name == MANIFEST else ''}")
    partial = folder.with_name(folder.name + ".partial")
    hint = f" (an interrupted build is in {partial}: rerun the same build to resume)" if partial.exists() else ""
    if not folder.exists():
        raise CorpusIndexError(f"index {folder}: no such folder; pass a folder written by 'grape-rewards index build'"
                               f"{hint}")
    if not manifest_file.is_file():
        raise CorpusIndexError(f"{folder} is not a grape-rewards index: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise CorpusIndexError(f"{manifest_file} is not valid JSON: {first}") from None
    if not isinstance(manifest, dict):
        raise CorpusIndexError(f"{manifest_file} holds a JSON {type(manifest).__name__}, not an object: it is not a "
                               "grape-rewards index manifest")
    if manifest.get("format") != INDEX_FORMAT:
        raise CorpusIndexError(f"{manifest_file} is not a grape-rewards index manifest "
                               f"(format={manifest.get('format')!r})")
    version = manifest.get("version", 0)
    if not _is_int(version):
        raise CorpusIndexError(f"{manifest_file}: version must be an integer, got {version!r}")
    if version > INDEX_VERSION:
        raise CorpusIndexError(f"{manifest_file} has format version {manifest['version']}; this grape-rewards reads "
                               f"version {INDEX_VERSION} and older: upgrade grape-rewards")
    for key, least in (("count", 0), ("dim", 1)):
        if not _is_int(manifest.get(key)) or manifest[key] < least:
            raise CorpusIndexError(f"{manifest_file}: {key!r} must be an integer >= {least}, got {manifest.get(key)!r}")
    for key in ("retriever", "checksums"):
        if not isinstance(manifest.get(key, {}), dict):
            raise CorpusIndexError(f"{manifest_file}: {key!r} must be an object, got {manifest[key]!r}")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


UNIT_NORM_TOLERANCE = 1e-2
"""How far a stored row's L2 norm may be from 1 (float16 storage rounds a unit row's norm by < 1e-3)."""


def read_embeddings(file: Path) -> torch.Tensor:
    """The (count, dim) float embeddings of an index's safetensors file; anything else is a one-line error."""
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for a file that is not one of its files
        raise CorpusIndexError(f"{file} is not a safetensors file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild the index") from None
    emb = tensors.get("embeddings")
    if emb is None or emb.ndim != 2 or not emb.is_floating_point():
        found = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
        raise CorpusIndexError(f"{file} must hold one 2-D float tensor named 'embeddings', it holds {found}")
    return emb


def read_ids(file: Path) -> list[str]:
    """The ids of an index: a JSON list of unique strings; anything else is a one-line error."""
    try:
        ids = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CorpusIndexError(f"{file} is not valid JSON: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if not isinstance(ids, list):
        raise CorpusIndexError(f"{file} must hold a JSON list of string ids, it holds a {type(ids).__name__}")
    seen: set[str] = set()
    for row, item_id in enumerate(ids):
        if not isinstance(item_id, str):
            raise CorpusIndexError(f"{file}: id at row {row} is {item_id!r}, not a string")
        if item_id in seen:
            raise CorpusIndexError(f"{file}: id {item_id!r} appears more than once (again at row {row})")
        seen.add(item_id)
    return ids


def check_unit_rows(embeddings: torch.Tensor, ids: Sequence[str], where: str,
                    tolerance: float = UNIT_NORM_TOLERANCE, chunk_rows: int = 1 << 16) -> float:
    """Refuse rows that are not finite unit vectors (a NaN row ranks first, a scaled one inflates every score);
    return the largest row norm.

    >>> check_unit_rows(torch.eye(2), ["a", "b"], "toy")
    1.0
    """
    largest = 0.0
    for start in range(0, embeddings.shape[0], chunk_rows):
        norms = torch.linalg.vector_norm(embeddings[start:start + chunk_rows], dim=1, dtype=torch.float32)
        bad = ~((norms - 1).abs() <= tolerance)  # NaN compares false: caught here too
        if bool(bad.any()):
            row = start + int(bad.nonzero()[0, 0])
            norm = float(norms[row - start])
            what = "non-finite values" if not math.isfinite(norm) else f"L2 norm {norm:.4g}, not 1"
            raise CorpusIndexError(f"{where}: row {row} (id {ids[row]!r}) has {what}; an index holds L2-normalised "
                                   "embeddings: rebuild it")
        if norms.numel():
            largest = max(largest, float(norms.max()))
    return largest


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU (fast matmuls), the stored float16 on GPUs (half the memory, fp32 accumulation)."""
    return torch.float16 if device.type == "cuda" else torch.float32


class CorpusIndex:
    """Embeddings of a corpus, their ids, and the manifest naming the retriever that made them."""

    def __init__(self, embeddings: torch.Tensor, ids: Sequence[str], manifest: dict[str, Any] | None = None,
                 path: str | Path | None = None, contents: ContentStore | None = None) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match {len(ids)} ids")
        self.embeddings = embeddings
        self.ids = list(ids)
        self.row_of = {item_id: row for row, item_id in enumerate(self.ids)}
        if len(self.row_of) != len(self.ids):
            raise ValueError("duplicate ids in the index")
        self.manifest = manifest or {}
        self.path = Path(path) if path is not None else None
        if contents is not None and len(contents) != len(self.ids):
            raise ValueError(f"contents of {len(contents)} items do not match {len(self.ids)} ids")
        self.content_store = contents
        """Each item's text (text corpora), or None: then an item's contents is its id."""
        self._searcher: Any = None
        self._column_sums: torch.Tensor | None = None
        self._max_row_norm: float | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    @property
    def column_sums(self) -> torch.Tensor:
        """float64 sum of the embeddings' rows (computed once: the embeddings are not modified after loading)."""
        if self._column_sums is None:
            self._column_sums = column_sums(self.embeddings)
        return self._column_sums

    @property
    def max_row_norm(self) -> float:
        """The largest L2 norm of a row (computed once): bounds the rounding of every score (exact ties)."""
        if self._max_row_norm is None:
            self._max_row_norm = max_row_norm(self.embeddings)
        return self._max_row_norm

    @property
    def contents_kind(self) -> str:
        """What :meth:`contents` gives: ``"text"`` (each item's text) or ``"id"`` (no texts are stored: an image
        corpus, or an index built before texts were kept beside the ids)."""
        return "text" if self.content_store is not None else "id"

    def contents(self, ids: Sequence[str]) -> list[str]:
        """Each item's contents (:attr:`contents_kind`); an unknown id raises :class:`UnknownIdError`."""
        rows = self.rows(ids)
        return self.content_store.get(rows) if self.content_store is not None else [str(i) for i in ids]

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.get("retriever", {}).get("fingerprint")

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "the in-memory index"

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        expected_fingerprint: str | None = None,
        expected_spec: str | None = None,
        verify_checksum: bool = True,
        dtype: torch.dtype | None = None,
    ) -> CorpusIndex:
        """Load an index folder, verifying its checksums and (when given) the retriever fingerprint.

        Args:
            expected_fingerprint: the fingerprint of the retriever the index will be used with; a
                different one is refused (mismatched embeddings give meaningless rewards).
            dtype: the in-memory dtype; default float32 on the CPU, float16 on GPUs.
        """
        folder = Path(path)
        manifest = read_manifest(folder)
        built_with = manifest.get("retriever", {})
        if expected_fingerprint is not None and built_with.get("fingerprint") != expected_fingerprint:
            raise CorpusIndexError(
                f"index {folder} was built with retriever {built_with.get('spec')!r} (fingerprint "
                f"{built_with.get('fingerprint')}), but it is being used with "
                f"{expected_spec or 'a retriever'!s} (fingerprint {expected_fingerprint}); embeddings from "
                "different models give meaningless rewards. Use the retriever the index was built with, or "
                f"rebuild it: grape-rewards index build --retriever {expected_spec or '<spec>'} ...")
        files = manifest.get("checksums", {})
        has_contents = CONTENTS in files
        remedy = ("split its parent index again (grape-rewards index shard)" if "shard" in manifest
                  else "rebuild the index")
        for name in (EMBEDDINGS, IDS, *(CONTENT_FILES if has_contents else ())):
            file = folder / name
            if not file.is_file():
                raise CorpusIndexError(f"index {folder} is incomplete: {name} is missing; {remedy}")
            if verify_checksum and files.get(name) != sha256_file(file):
                raise CorpusIndexError(f"index {folder}: checksum of {name} does not match the manifest (the file "
                                       f"is corrupt or was changed after it was written); {remedy}")
        embeddings = read_embeddings(folder / EMBEDDINGS)
        ids = read_ids(folder / IDS)
        if embeddings.shape != (manifest["count"], manifest["dim"]) or len(ids) != manifest["count"]:
            raise CorpusIndexError(f"index {folder}: files hold {tuple(embeddings.shape)} embeddings and {len(ids)} "
                                   f"ids, the manifest says {manifest['count']} x {manifest['dim']}")
        largest = check_unit_rows(embeddings, ids, f"index {folder}")
        dev = torch.device(device)
        embeddings = embeddings.to(device=dev, dtype=dtype or default_compute_dtype(dev))
        try:
            contents = ContentStore.open(folder, len(ids)) if has_contents else None
        except ContentsError as exc:
            raise CorpusIndexError(f"index {folder}: {exc}") from None
        index = cls(embeddings, ids, manifest, folder, contents)
        index._max_row_norm = largest
        return index

    def rows(self, ids: Sequence[str]) -> list[int]:
        """Corpus rows of ``ids``; an unknown id raises :class:`UnknownIdError` naming it."""
        return lookup_rows(self.row_of, ids, self.name)

    def vectors(self, ids: Sequence[str]) -> torch.Tensor:
        """The (float32) embeddings of ``ids``, e.g. CIRR's reference images for composed queries."""
        return self.embeddings[to_device(torch.tensor(self.rows(ids), dtype=torch.long), self.device)].to(torch.float32)

    def rank(
        self,
        queries: torch.Tensor,
        target_ids: Sequence[Sequence[str]],
        excluded_ids: Sequence[Sequence[str]] | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        extras: ScanExtras = NO_EXTRAS,
    ) -> RankStats:
        """Exact corpus-relative rank of each query's targets (see :func:`grape_rewards.corpus.corpus_rank`)."""
        targets = [self.rows(t) for t in target_ids]
        excluded = [self.rows(e) for e in excluded_ids] if excluded_ids is not None else None
        return self.rank_rows(queries, targets, excluded, chunk_elements, extras)

    def rank_rows(
        self,
        queries: torch.Tensor,
        targets: Sequence[Sequence[int]],
        excluded: Sequence[Sequence[int]] | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        extras: ScanExtras = NO_EXTRAS,
    ) -> RankStats:
        """:meth:`rank` for ids already resolved to rows (:meth:`rows`): what a caller that validated them calls."""
        return corpus_rank(queries, self.embeddings, targets, excluded, chunk_elements=chunk_elements,
                           corpus_sum=self.column_sums, corpus_norm=self.max_row_norm, extras=extras)

    def search(self, queries: torch.Tensor, k: int, backend: str = "auto") -> tuple[torch.Tensor, list[list[str]]]:
        """Top-``k`` corpus items of each query: (scores (Q, k), ids). FAISS when installed, else exact torch."""
        from .search import build_searcher

        if self._searcher is None or (backend != "auto" and self._searcher.backend != backend):
            self._searcher = build_searcher(self.embeddings, backend=backend)
        scores, rows = self._searcher.search(queries, min(k, len(self)))
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows.tolist()]
