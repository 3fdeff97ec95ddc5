"""A corpus split into shards: writing the shard folders, and ranking exactly over shards held anywhere.

Layout written by :func:`shard_index` (``grape-rewards index shard DIR --out OUT --num-shards S``)::

    OUT/shards.json              format, number of shards, total count, retriever, the parent's checksums, folders
    OUT/shard-000-of-004/        a valid index folder (manifest.json, embeddings.safetensors, ids.json) whose
    OUT/shard-001-of-004/        manifest adds ``shard: {index, count, row_offset, total_count, parent_checksums}``
    ...                          (``count`` is the number of shards; the manifest's own ``count`` its rows)

Shard ``i`` holds the parent's contiguous rows ``[row_offset, row_offset + rows)``, stored bytes unchanged, so the
shards of an index rank exactly as the index does. When the parent keeps its items' texts (contents.bin and its
offsets), each shard keeps its rows' texts, checksummed in its manifest like its other files.

Rank is additive over a partition (see :class:`~grape_rewards.corpus.rank.ScanCounts`); :class:`ShardedIndex`
ranks in two phases:

1. each shard holding some of a query's targets scores them (:func:`~grape_rewards.corpus.rank.target_scores`);
   the best target score is the max over those shards;
2. every shard counts its items above that threshold, leaving out its own rows of the query's targets and
   exclusions (:func:`~grape_rewards.corpus.rank.scan_counts`); the counts are summed
   (:func:`~grape_rewards.corpus.rank.merge_counts`).

A result is returned only if all S shards answered and the merged number of candidates equals
``N - |T ∪ E|`` for every query: a missing shard is an error (:class:`IncompleteCorpusError`), never a smaller N.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..corpus.contents import CONTENT_FILES, CONTENTS, ContentsError, ContentStore, write_contents_rows
from ..corpus.files import atomic_write, atomic_write_bytes, atomic_write_json, replace_folder, sha256_file
from ..corpus.index import (
    EMBEDDINGS,
    IDS,
    MANIFEST,
    CorpusIndex,
    CorpusIndexError,
    lookup_rows,
    read_manifest,
)
from ..corpus.rank import (
    DEFAULT_CHUNK_ELEMENTS,
    NO_EXTRAS,
    RankStats,
    ScanCounts,
    ScanExtras,
    finish_rank,
    merge_counts,
    scan_counts,
    target_scores,
)

if TYPE_CHECKING:
    from ..scorer import RewardScorer
    from ..server.config import ServeConfig

SHARD_SET = "shards.json"
SHARD_SET_FORMAT = "grape-rewards-shards"
SHARD_SET_VERSION = 1
T = TypeVar("T")


class ShardUnavailable(RuntimeError):
    """A shard did not answer in time (its process is down and not back yet); retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IncompleteCorpusError(RuntimeError):
    """The shards' answers do not cover the whole corpus: a rank over part of it would be wrong, so none is given."""


# -- writing shards ------------------------------------------------------------------------------------------
def shard_bounds(total: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of ``num_shards`` non-empty shards whose sizes differ by at most one.

    >>> shard_bounds(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    if num_shards < 1:
        raise ValueError(f"the number of shards must be >= 1, got {num_shards}")
    if num_shards > total:
        raise ValueError(f"cannot split {total} items into {num_shards} non-empty shards")
    edges = [total * i // num_shards for i in range(num_shards + 1)]
    return list(itertools.pairwise(edges))


def shard_folder_name(index: int, num_shards: int) -> str:
    """``shard-001-of-004``."""
    return f"shard-{index:03d}-of-{num_shards:03d}"


def shard_index(src: str | Path, out: str | Path, num_shards: int, overwrite: bool = False) -> list[Path]:
    """Split the index folder ``src`` into ``num_shards`` shard index folders under ``out``; return their paths.

    The parent's checksums are verified first. Each shard keeps its rows' texts when the parent keeps texts
    (text corpora). The shards are written to ``<out>.partial`` and renamed into place, so ``out`` holds either a
    complete shard set or nothing new.
    """
    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    if "shard" in manifest:
        raise CorpusIndexError(f"{src} is itself shard {manifest['shard'].get('index')} of a sharded index; shard the "
                               "parent index instead")
    if out.resolve() == src.resolve():
        raise ValueError("--out must be a new folder, not the index being sharded")
    if (out / SHARD_SET).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a sharded index; replace it with overwrite=True "
                              "(--overwrite on the command line)")
    if out.exists() and not (out / SHARD_SET).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a sharded index; choose an empty or new folder")
    checksums = dict(manifest.get("checksums", {}))
    has_contents = CONTENTS in checksums
    for name in (EMBEDDINGS, IDS, *(CONTENT_FILES if has_contents else ())):
        file = src / name
        if not file.is_file():
            raise CorpusIndexError(f"index {src} is incomplete: {name} is missing")
        if checksums.get(name) != sha256_file(file):
            raise CorpusIndexError(f"index {src}: checksum of {name} does not match the manifest (the file is corrupt "
                                   "or was changed after the build); rebuild the index before sharding it")
    ids = json.loads((src / IDS).read_text(encoding="utf-8"))
    with safe_open(str(src / EMBEDDINGS), framework="pt") as f:  # read one shard at a time, not the whole corpus
        embeddings = f.get_slice("embeddings")
        shape = tuple(embeddings.get_shape())
        if shape != (manifest["count"], manifest["dim"]) or len(ids) != manifest["count"]:
            raise CorpusIndexError(f"index {src}: files hold {shape} embeddings and {len(ids)} ids, the manifest says "
                                   f"{manifest['count']} x {manifest['dim']}")
        try:
            contents = ContentStore.open(src, len(ids)) if has_contents else None
        except ContentsError as exc:
            raise CorpusIndexError(f"index {src}: {exc}") from None
        _write_shards(src, out, manifest, embeddings, ids, num_shards, contents)
    return [out / shard_folder_name(i, num_shards) for i in range(num_shards)]


def _write_shards(src: Path, out: Path, manifest: dict[str, Any], embeddings: Any, ids: list[str],
                  num_shards: int, contents: ContentStore | None) -> None:
    """Write the shard folders (with their rows' texts when ``contents`` is given) into ``<out>.partial`` and rename
    it onto ``out``."""
    checksums = dict(manifest.get("checksums", {}))
    bounds = shard_bounds(len(ids), num_shards)

    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    names = [shard_folder_name(i, num_shards) for i in range(num_shards)]
    for i, ((start, end), name) in enumerate(zip(bounds, names)):
        folder = staging / name
        folder.mkdir()
        part = embeddings[start:end].contiguous()
        atomic_write(folder / EMBEDDINGS, lambda tmp, part=part: save_file({"embeddings": part}, str(tmp)))
        atomic_write_bytes(folder / IDS, json.dumps(ids[start:end], ensure_ascii=False).encode("utf-8"))
        written = (EMBEDDINGS, IDS)
        if contents is not None:
            write_contents_rows(contents, start, end, folder)
            written += CONTENT_FILES
        atomic_write_json(folder / MANIFEST, {
            **manifest,
            "count": end - start,
            "checksums": {name: sha256_file(folder / name) for name in written},
            "shard": {"index": i, "count": num_shards, "row_offset": start, "total_count": len(ids),
                      "parent_checksums": checksums},
        })
    atomic_write_json(staging / SHARD_SET, {
        "format": SHARD_SET_FORMAT, "version": SHARD_SET_VERSION, "count": num_shards, "total_count": len(ids),
        "dim": manifest["dim"], "retriever": manifest.get("retriever", {}), "parent_checksums": checksums,
        "parent": str(src), "shards": names,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    replace_folder(staging, out)


# -- reading a shard set ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSet:
    """A validated shard set folder: every shard present, consistent and contiguous."""

    path: Path
    folders: list[Path]
    manifests: list[dict[str, Any]]

    @property
    def num_shards(self) -> int:
        return len(self.folders)

    @property
    def total_count(self) -> int:
        return int(self.manifests[0]["shard"]["total_count"])

    @property
    def retriever(self) -> dict[str, Any]:
        return dict(self.manifests[0].get("retriever", {}))


def is_shard_set(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`shard_index`."""
    return (Path(path) / SHARD_SET).is_file()


def read_shard_set(path: str | Path) -> ShardSet:
    """Read and check a shard set folder; a missing or inconsistent shard is an :class:`CorpusIndexError`."""
    folder = Path(path)
    meta_file = folder / SHARD_SET
    if not meta_file.is_file():
        hint = ""
        if (folder / MANIFEST).is_file():
            hint = (f": it is an unsharded index; split it with grape-rewards index shard {folder} --out OUT "
                    "--num-shards S, and serve OUT")
        raise CorpusIndexError(f"{folder} is not a sharded index ({SHARD_SET} is missing){hint}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorpusIndexError(f"{meta_file} is not valid JSON: {exc}") from None
    if meta.get("format") != SHARD_SET_FORMAT:
        raise CorpusIndexError(f"{meta_file} is not a grape-rewards shard set (format={meta.get('format')!r})")
    folders = [folder / name for name in meta["shards"]]
    for i, shard_folder in enumerate(folders):
        if not (shard_folder / MANIFEST).is_file():
            raise CorpusIndexError(f"{folder}: shard {i} of {len(folders)} is missing ({shard_folder}); a sharded "
                                   "corpus is only served whole: restore it or re-run grape-rewards index shard")
    manifests = [read_manifest(f) for f in folders]
    check_shard_manifests(manifests, str(folder))
    if manifests[0]["shard"]["total_count"] != meta["total_count"] or \
            manifests[0]["shard"]["parent_checksums"] != meta["parent_checksums"]:
        raise CorpusIndexError(f"{folder}: the shards do not belong to the index {SHARD_SET} describes")
    return ShardSet(folder, folders, manifests)


def check_shard_manifests(manifests: Sequence[dict[str, Any]], where: str = "the sharded index") -> list[int]:
    """Check that ``manifests`` are shards 0..S-1 of one parent, contiguous and complete; return the row offsets."""
    if not manifests:
        raise CorpusIndexError(f"{where}: no shards")
    first = manifests[0]
    if "shard" not in first:
        raise CorpusIndexError(f"{where}: shard 0 is not a shard (its manifest has no 'shard' section)")
    num_shards = len(manifests)
    offsets = []
    row = 0
    for i, manifest in enumerate(manifests):
        info = manifest.get("shard")
        if info is None or info.get("index") != i or info.get("count") != num_shards:
            got = None if info is None else f"{info.get('index')} of {info.get('count')}"
            raise CorpusIndexError(f"{where}: expected shard {i} of {num_shards}, found {got}")
        if info["row_offset"] != row:
            raise CorpusIndexError(f"{where}: shard {i} starts at row {info['row_offset']}, expected {row} (a shard is "
                                   "missing or from another split)")
        for key in ("total_count", "parent_checksums"):
            if info[key] != first["shard"][key]:
                raise CorpusIndexError(f"{where}: shard {i} comes from another index ({key} differs from shard 0's)")
        same = ("fingerprint", "spec")
        if any(manifest.get("retriever", {}).get(k) != first.get("retriever", {}).get(k) for k in same) or \
                manifest["dim"] != first["dim"]:
            raise CorpusIndexError(f"{where}: shard {i} was built with another retriever than shard 0")
        offsets.append(row)
        row += int(manifest["count"])
    if row != first["shard"]["total_count"]:
        raise CorpusIndexError(f"{where}: the shards hold {row} items, the parent held {first['shard']['total_count']}")
    return offsets


def parent_manifest(manifests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The parent index's manifest, rebuilt from its shards' (count and checksums of the whole)."""
    out = {k: v for k, v in manifests[0].items() if k != "shard"}
    out["count"] = int(manifests[0]["shard"]["total_count"])
    out["checksums"] = dict(manifests[0]["shard"]["parent_checksums"])
    out["shards"] = len(manifests)
    return out


# -- backends --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardScan:
    """One shard's phase-2 answer: which shard, how many rows it holds, and its scan counts."""

    shard: int
    rows: int
    counts: ScanCounts


class ShardBackend(Protocol):
    """Where the shards live and run. Tensors in and out are on the CPU; shards are numbered 0..S-1."""

    def manifests(self) -> list[dict[str, Any]]:
        """Each shard's manifest, in shard order."""
        ...

    def shard_ids(self) -> list[list[str]]:
        """Each shard's ids, in shard order."""
        ...

    def target_scores(self, queries: torch.Tensor, targets: dict[int, list[list[int]]]) -> dict[int, torch.Tensor]:
        """Phase 1: for each shard in ``targets``, each query's best score among its local target rows there."""
        ...

    def scan(self, queries: torch.Tensor, thresholds: torch.Tensor, masked: list[list[list[int]]],
             chunk_elements: int, extras: ScanExtras = NO_EXTRAS) -> list[ShardScan]:
        """Phase 2: every shard's scan counts; ``masked[s][q]`` are query q's local rows left out on shard s."""
        ...

    def vectors(self, rows: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """float32 embeddings of local rows, per shard."""
        ...

    def contents(self, rows: dict[int, list[int]]) -> dict[int, list[str]]:
        """The contents of local rows (their texts, on shards that keep texts), per shard."""
        ...

    def search(self, queries: torch.Tensor, k: int, backend: str) -> list[tuple[torch.Tensor, list[list[str]]]]:
        """Every shard's top-``k`` (scores, ids), in shard order."""
        ...

    def close(self) -> None:
        """Release what the backend holds."""
        ...


class LocalShards:
    """Shards held in this process, each a :class:`CorpusIndex` on its own device (one node, several GPUs).

    Args:
        parallel: run the shards concurrently, one thread each; default: when they are on different devices
            (shards sharing one device run in turn).
    """

    def __init__(self, shards: Sequence[CorpusIndex], parallel: bool | None = None) -> None:
        self.shards = list(shards)
        if parallel is None:
            parallel = len({str(s.device) for s in self.shards}) > 1
        self._pool = ThreadPoolExecutor(len(self.shards), "grape-shard") if parallel else None

    @classmethod
    def load(cls, path: str | Path | ShardSet, devices: Sequence[str | torch.device] = ("cpu",),
             verify_checksum: bool = True, parallel: bool | None = None) -> LocalShards:
        """Load every shard of a shard set, shard ``i`` on ``devices[i % len(devices)]``."""
        shard_set = path if isinstance(path, ShardSet) else read_shard_set(path)
        if not devices:
            raise ValueError("devices must name at least one device")
        return cls([CorpusIndex.load(folder, device=devices[i % len(devices)], verify_checksum=verify_checksum)
                    for i, folder in enumerate(shard_set.folders)], parallel=parallel)

    def _map(self, fn: Callable[[int], T], shards: Sequence[int]) -> dict[int, T]:
        if self._pool is None:
            return {s: fn(s) for s in shards}
        futures = {s: self._pool.submit(fn, s) for s in shards}
        return {s: f.result() for s, f in futures.items()}

    def manifests(self) -> list[dict[str, Any]]:
        return [s.manifest for s in self.shards]

    def shard_ids(self) -> list[list[str]]:
        return [s.ids for s in self.shards]

    def target_scores(self, queries: torch.Tensor, targets: dict[int, list[list[int]]]) -> dict[int, torch.Tensor]:
        return self._map(lambda s: target_scores(queries, self.shards[s].embeddings, targets[s]), list(targets))

    def scan(self, queries: torch.Tensor, thresholds: torch.Tensor, masked: list[list[list[int]]],
             chunk_elements: int, extras: ScanExtras = NO_EXTRAS) -> list[ShardScan]:
        def one(s: int) -> ShardScan:
            shard = self.shards[s]
            return ShardScan(s, len(shard), scan_counts(queries, shard.embeddings, thresholds, masked[s],
                                                        chunk_elements, shard.column_sums, shard.max_row_norm,
                                                        extras))

        return list(self._map(one, range(len(self.shards))).values())

    def vectors(self, rows: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        return {s: self.shards[s].embeddings[r].to("cpu", torch.float32) for s, r in rows.items()}

    def contents(self, rows: dict[int, list[int]]) -> dict[int, list[str]]:
        return {s: self.shards[s].contents([self.shards[s].ids[i] for i in r]) for s, r in rows.items()}

    def search(self, queries: torch.Tensor, k: int, backend: str) -> list[tuple[torch.Tensor, list[list[str]]]]:
        found = self._map(lambda s: self.shards[s].search(queries, k, backend=backend), range(len(self.shards)))
        return [found[s] for s in range(len(self.shards))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# -- the sharded index -------------------------------------------------------------------------------------------
class ShardedIndex:
    """A corpus held in S shards, ranked exactly; duck-types :class:`CorpusIndex` for the :class:`RewardScorer`.

    It keeps the global ids and the id -> (shard, local row) map; embeddings stay in the backend. Queries are
    scattered to the shards as they come (encode once, on the caller's side).

    Args:
        backend: where the shards are (:class:`LocalShards`, or Ray actors: ``ray_shards.RayShards``).
        path: the shard set folder, for messages and ``/info``.
    """

    def __init__(self, backend: ShardBackend, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        manifests = backend.manifests()
        self.offsets = check_shard_manifests(manifests, self.name)
        self.shard_rows = [int(m["count"]) for m in manifests]
        shard_ids = backend.shard_ids()
        if [len(ids) for ids in shard_ids] != self.shard_rows:
            raise CorpusIndexError(f"{self.name}: the shards hold {[len(i) for i in shard_ids]} ids, their manifests "
                                   f"say {self.shard_rows}")
        self.ids = [item_id for ids in shard_ids for item_id in ids]
        self.row_of = {item_id: row for row, item_id in enumerate(self.ids)}
        if len(self.row_of) != len(self.ids):
            raise ValueError("duplicate ids across the shards")
        self.manifest = parent_manifest(manifests)
        self.backend = backend
        self._starts = torch.tensor(self.offsets[1:], dtype=torch.long)
        self._has_texts = all(CONTENTS in m.get("checksums", {}) for m in manifests)

    @classmethod
    def load(cls, path: str | Path, devices: Sequence[str | torch.device] = ("cpu",),
             expected_fingerprint: str | None = None, verify_checksum: bool = True) -> ShardedIndex:
        """Load a shard set into this process, shard ``i`` on ``devices[i % len(devices)]``."""
        shard_set = read_shard_set(path)
        fingerprint = shard_set.retriever.get("fingerprint")
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise CorpusIndexError(f"sharded index {path} was built with retriever {shard_set.retriever.get('spec')!r} "
                                   f"(fingerprint {fingerprint}), not the one it is used with (fingerprint "
                                   f"{expected_fingerprint}); embeddings from different models give meaningless "
                                   "rewards")
        return cls(LocalShards.load(shard_set, devices, verify_checksum=verify_checksum), path)

    # -- what CorpusIndex offers ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_shards(self) -> int:
        return len(self.shard_rows)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def device(self) -> torch.device:
        """Where queries are handed over: the CPU (each shard moves them to its own device)."""
        return torch.device("cpu")

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.get("retriever", {}).get("fingerprint")

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "the sharded index"

    def rows(self, ids: Sequence[str]) -> list[int]:
        """Global rows of ``ids``; an unknown id raises :class:`UnknownIdError` naming it."""
        return lookup_rows(self.row_of, ids, self.name)

    def locate(self, rows: Sequence[int]) -> list[tuple[int, int]]:
        """(shard, local row) of global rows."""
        if not rows:
            return []
        shards = torch.bucketize(torch.tensor(rows, dtype=torch.long), self._starts, right=True).tolist()
        return [(s, r - self.offsets[s]) for s, r in zip(shards, rows)]

    def vectors(self, ids: Sequence[str]) -> torch.Tensor:
        """The float32 embeddings of ``ids`` (fetched from their shards)."""
        rows = self._fetch(ids, self.backend.vectors, "vectors")
        return torch.stack(rows) if rows else torch.empty(0, self.dim, dtype=torch.float32)

    @property
    def contents_kind(self) -> str:
        """What :meth:`contents` gives: ``"text"`` when every shard keeps its items' texts, else ``"id"`` (an image
        corpus, or shards of an index built before texts were kept)."""
        return "text" if self._has_texts else "id"

    def contents(self, ids: Sequence[str]) -> list[str]:
        """Each item's contents (:attr:`contents_kind`), asked of the shards holding ``ids`` (one call per shard);
        an unknown id raises :class:`UnknownIdError`."""
        if not self._has_texts:
            self.rows(ids)  # unknown ids are refused all the same
            return [str(i) for i in ids]
        return self._fetch(ids, self.backend.contents, "contents")

    def _fetch(self, ids: Sequence[str], fetch: Callable[[dict[int, list[int]]], dict[int, Sequence[T]]],
               what: str) -> list[T]:
        """``fetch`` each item of ``ids`` from its shard (one call with every shard's local rows), in ``ids``' order."""
        places = self.locate(self.rows(ids))
        wanted: dict[int, list[int]] = {}
        for s, local in places:
            wanted.setdefault(s, []).append(local)
        if not wanted:
            return []
        got = fetch(wanted)
        short = sorted(s for s in wanted if s not in got or len(got[s]) != len(wanted[s]))
        if short:
            raise IncompleteCorpusError(f"{self.name}: shards {short} did not return the {what} asked of them")
        taken = dict.fromkeys(wanted, 0)
        out = []
        for s, _ in places:
            out.append(got[s][taken[s]])
            taken[s] += 1
        return out

    def rank(self, queries: torch.Tensor, target_ids: Sequence[Sequence[str]],
             excluded_ids: Sequence[Sequence[str]] | None = None,
             chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, extras: ScanExtras = NO_EXTRAS) -> RankStats:
        """Exact corpus-relative rank over all shards (the same statistics as :meth:`CorpusIndex.rank`)."""
        targets = [self.rows(t) for t in target_ids]
        excluded = [self.rows(e) for e in excluded_ids] if excluded_ids is not None else None
        return self.rank_rows(queries, targets, excluded, chunk_elements, extras)

    def rank_rows(self, queries: torch.Tensor, targets: Sequence[Sequence[int]],
                  excluded: Sequence[Sequence[int]] | None = None,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, extras: ScanExtras = NO_EXTRAS) -> RankStats:
        """:meth:`rank` for ids already resolved to global rows (:meth:`rows`)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {tuple(queries.shape)}")
        excluded = excluded if excluded is not None else [[] for _ in targets]
        if len(targets) != queries.shape[0] or len(excluded) != len(targets):
            raise ValueError(f"got {queries.shape[0]} queries, {len(targets)} target lists and {len(excluded)} "
                             "excluded lists")
        for i, t in enumerate(targets):
            if not t:
                raise ValueError(f"query {i} has no target")
        num_queries = len(targets)
        if num_queries == 0:
            return finish_rank(ScanCounts.empty(extras), torch.zeros(0, dtype=torch.float64))
        q = queries.detach().to("cpu", torch.float32).contiguous()

        # Phase 1: the best target score, from the shards holding targets.
        shard_targets: dict[int, list[list[int]]] = {}
        for i, rows in enumerate(targets):
            for s, local in self.locate(rows):
                shard_targets.setdefault(s, [[] for _ in range(num_queries)])[i].append(local)
        scores = self.backend.target_scores(q, shard_targets)
        if set(scores) != set(shard_targets):
            raise IncompleteCorpusError(f"{self.name}: shards {sorted(set(shard_targets) - set(scores))} did not "
                                        "score their targets")
        thresholds = torch.stack([scores[s].to(torch.float64) for s in sorted(scores)]).amax(0)
        if thresholds.shape != (num_queries,) or not torch.isfinite(thresholds).all():
            raise IncompleteCorpusError(f"{self.name}: some queries got no target score from the shards")

        # Phase 2: every shard counts the items above the threshold; the counts add up.
        masked: list[list[list[int]]] = [[[] for _ in range(num_queries)] for _ in range(self.num_shards)]
        for i, (t, e) in enumerate(zip(targets, excluded)):
            for s, local in self.locate(list(t) + list(e)):
                masked[s][i].append(local)
        scans = self.backend.scan(q, thresholds, masked, chunk_elements, extras)
        expected = torch.tensor([len(self) - len(set(t) | set(e)) for t, e in zip(targets, excluded)])
        return finish_rank(self._merge_whole(scans, expected), thresholds)

    def _merge_whole(self, scans: Sequence[ShardScan], expected_others: torch.Tensor) -> ScanCounts:
        """Merge the shards' counts, refusing anything but one answer from each of the S shards covering N."""
        got = sorted(scan.shard for scan in scans)
        if got != list(range(self.num_shards)):
            raise IncompleteCorpusError(f"{self.name}: answers from shards {got}, expected each of "
                                        f"0..{self.num_shards - 1} once; refusing to rank over part of the corpus")
        for scan in scans:
            if scan.rows != self.shard_rows[scan.shard]:
                raise IncompleteCorpusError(f"{self.name}: shard {scan.shard} scanned {scan.rows} rows, it holds "
                                            f"{self.shard_rows[scan.shard]}")
        merged = merge_counts([scan.counts for scan in sorted(scans, key=lambda x: x.shard)])
        if not torch.equal(merged.n_others, expected_others):
            raise IncompleteCorpusError(f"{self.name}: the shards' candidates ({merged.n_others.tolist()}) do not "
                                        f"add up to the corpus ({expected_others.tolist()}); refusing a rank over "
                                        "part of it")
        return merged

    def search(self, queries: torch.Tensor, k: int, backend: str = "auto") -> tuple[torch.Tensor, list[list[str]]]:
        """Top-``k`` over all shards: the merge of each shard's top-``k`` (scores (Q, min(k, N)), ids)."""
        q = queries.detach().to("cpu", torch.float32).contiguous()
        k = min(k, len(self))
        found = self.backend.search(q, k, backend)
        if len(found) != self.num_shards:
            raise IncompleteCorpusError(f"{self.name}: {len(found)} of {self.num_shards} shards answered the search")
        out_scores = torch.empty(q.shape[0], k, dtype=torch.float32)
        out_ids: list[list[str]] = []
        for i in range(q.shape[0]):
            pairs = [(float(score), item_id) for scores, ids in found
                     for score, item_id in zip(scores[i].tolist(), ids[i])]
            pairs.sort(key=lambda p: -p[0])  # stable: ties keep shard order
            if len(pairs) < k:
                raise IncompleteCorpusError(f"{self.name}: the shards returned {len(pairs)} results, expected {k}")
            out_scores[i] = torch.tensor([p[0] for p in pairs[:k]])
            out_ids.append([p[1] for p in pairs[:k]])
        return out_scores, out_ids

    def close(self) -> None:
        self.backend.close()


# -- a scorer over shards ------------------------------------------------------------------------------------------
def load_sharded_scorer(config: ServeConfig, backend: ShardBackend | None = None,
                        devices: Sequence[str] | None = None) -> RewardScorer:
    """The scorer ``grape-rewards serve`` would build, over the shard set ``config.index``.

    Args:
        backend: where the shards are (e.g. Ray actors); default: loaded here, on ``devices`` (default: every
            visible GPU in turn, else the CPU).
    """
    from ..retrievers import create_retriever
    from ..scorer import RewardScorer

    if backend is None:
        shard_set = read_shard_set(config.index)
        if devices is None:
            count = torch.cuda.device_count() if config.device in ("auto", "cuda") else 0
            devices = [f"cuda:{i}" for i in range(count)] or [config.device if config.device != "auto" else "cpu"]
        backend = LocalShards.load(shard_set, devices)
    index = ShardedIndex(backend, config.index)
    spec = config.retriever or index.manifest.get("retriever", {}).get("spec")
    if not spec:
        raise CorpusIndexError(f"sharded index {config.index} does not name its retriever; pass --retriever")
    retriever = create_retriever(spec, device=config.device, fusion=config.fusion, image_weight=config.image_weight)
    return RewardScorer(retriever, index, config.load_reward_config(), cache_size=config.cache_size,
                        cache_bytes=config.cache_bytes, max_text_chars=config.max_text_chars)
