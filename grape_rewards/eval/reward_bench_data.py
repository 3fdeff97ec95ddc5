"""The reward benchmark's inputs: queries with their targets, and candidate rewrites per query.

Queries (JSONL, one object per line; the demo's ``queries.jsonl`` is one)::

    {"query_id": "q1", "query": "一只狗在草地上", "target_ids": ["c7"],      # required
     "excluded_ids": [], "reference_id": null,                            # optional, as in labels
     "group": "seed-0",                                                   # optional: a replication unit (seed)
     "candidates": ["a dog on grass", {"rewrite": "dog, grass", "kind": "keywords"}]}  # optional: inline

Candidates (JSONL, one rewrite per line, any number per query)::

    {"query_id": "q1", "rewrite": "a dog on the grass", "kind": "sampled"}  # kind optional (default "candidate")

Every row is checked with its ``file:line`` before anything runs: unknown keys, missing fields, unknown query ids,
queries with fewer than two candidates.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..jsonl import jsonl_objects

QUERY_KEYS = {"query_id", "query", "target_ids", "excluded_ids", "reference_id", "group", "kind", "candidates"}
CANDIDATE_KEYS = {"query_id", "rewrite", "kind"}
INLINE_KIND = "candidate"
"""The kind of a candidate given without one (inline candidates, rows without ``kind``)."""


class BenchInputError(ValueError):
    """A reward benchmark input that cannot be used; the message names the file, line and problem."""


@dataclass(frozen=True)
class BenchQuery:
    """One query: its text, where its targets are, and its replication group (a seed), if any."""

    query_id: str
    query: str
    target_ids: tuple[str, ...]
    excluded_ids: tuple[str, ...] = ()
    reference_id: str | None = None
    group: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class BenchCandidate:
    """One candidate rewrite of a query, and where it came from (``sampled``, ``rule``, ``keywords`` ...)."""

    query_id: str
    rewrite: str
    kind: str = INLINE_KIND


def _ids(value: Any, where: str, name: str, required: bool) -> tuple[str, ...]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise BenchInputError(f"{where}: {name} must be a list of corpus ids")
    if required and not value:
        raise BenchInputError(f"{where}: {name} is empty; every query needs at least one target")
    return tuple(str(v) for v in value)


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BenchInputError(f"{where}: {name} must be a non-empty string")
    return value


def read_bench_queries(path: str | Path) -> tuple[list[BenchQuery], list[BenchCandidate]]:
    """The queries of a JSONL file, and the candidates given inline (``candidates``), in file order."""
    queries: list[BenchQuery] = []
    inline: list[BenchCandidate] = []
    seen: dict[str, str] = {}
    for where, row in jsonl_rows(path, "queries"):
        unknown = sorted(set(row) - QUERY_KEYS)
        if unknown:
            raise BenchInputError(f"{where}: unknown key(s) {unknown}; a query has {sorted(QUERY_KEYS)}")
        if "query_id" not in row or "query" not in row or "target_ids" not in row:
            raise BenchInputError(f"{where}: a query needs query_id, query and target_ids")
        query_id = str(row["query_id"])
        if query_id in seen:
            raise BenchInputError(f"{where}: query_id {query_id!r} repeats {seen[query_id]}")
        seen[query_id] = where
        group, reference = row.get("group"), row.get("reference_id")
        queries.append(BenchQuery(query_id, _text(row["query"], where, "query"),
                                  _ids(row["target_ids"], where, "target_ids", True),
                                  _ids(row.get("excluded_ids"), where, "excluded_ids", False),
                                  None if reference is None else str(reference),
                                  None if group is None else str(group), row.get("kind")))
        candidates = row.get("candidates", [])
        if not isinstance(candidates, list):
            raise BenchInputError(f"{where}: candidates must be a list of rewrites")
        for j, item in enumerate(candidates):
            if isinstance(item, dict):
                if set(item) - {"rewrite", "kind"} or "rewrite" not in item:
                    raise BenchInputError(f"{where}: candidates[{j}] is an object with rewrite (and kind) only")
                kind = item.get("kind", INLINE_KIND)
                if not isinstance(kind, str) or not kind:
                    raise BenchInputError(f"{where}: candidates[{j}].kind must be a non-empty string")
                inline.append(BenchCandidate(query_id, _text(item["rewrite"], where, f"candidates[{j}]"), kind))
            else:
                inline.append(BenchCandidate(query_id, _text(item, where, f"candidates[{j}]")))
    if not queries:
        raise BenchInputError(f"{path}: no queries")
    return queries, inline


def read_candidates(path: str | Path, queries: Mapping[str, BenchQuery]) -> list[BenchCandidate]:
    """The candidates of a JSONL file; each must name a query of ``queries``."""
    out: list[BenchCandidate] = []
    for where, row in jsonl_rows(path, "candidates"):
        unknown = sorted(set(row) - CANDIDATE_KEYS)
        if unknown:
            raise BenchInputError(f"{where}: unknown key(s) {unknown}; a candidate has {sorted(CANDIDATE_KEYS)}")
        if "query_id" not in row or "rewrite" not in row:
            raise BenchInputError(f"{where}: a candidate needs query_id and rewrite")
        query_id = str(row["query_id"])
        if query_id not in queries:
            raise BenchInputError(f"{where}: query_id {query_id!r} is not among the queries")
        kind = row.get("kind", INLINE_KIND)
        if not isinstance(kind, str) or not kind:
            raise BenchInputError(f"{where}: kind must be a non-empty string")
        rewrite = row["rewrite"]
        if not isinstance(rewrite, str):
            raise BenchInputError(f"{where}: rewrite must be a string")
        out.append(BenchCandidate(query_id, rewrite, kind))
    return out


def group_candidates(queries: Sequence[BenchQuery], candidates: Iterable[BenchCandidate],
                     kinds: Sequence[str] | None = None, min_candidates: int = 2) -> dict[str, list[BenchCandidate]]:
    """Each query's candidates (of ``kinds``, when given), in order; a query with fewer than ``min_candidates`` is
    refused, since a reward cannot pick among fewer than two."""
    by_query: dict[str, list[BenchCandidate]] = {q.query_id: [] for q in queries}
    for c in candidates:
        if c.query_id not in by_query:
            raise BenchInputError(f"candidate {c.rewrite[:40]!r} names query {c.query_id!r}, which is not among the "
                                  "queries")
        if kinds is None or c.kind in kinds:
            by_query[c.query_id].append(c)
    short = [q for q, group in by_query.items() if len(group) < min_candidates]
    if short:
        which = f" of kind {', '.join(kinds)}" if kinds else ""
        raise BenchInputError(f"{len(short)} queries have fewer than {min_candidates} candidates{which} (first: "
                              f"{short[0]!r}, {len(by_query[short[0]])}); a reward can only pick among two or more")
    return by_query


def write_candidates(path: str | Path, candidates: Iterable[BenchCandidate]) -> None:
    """Write candidates as JSONL (atomically), so a sampled set can be read back by :func:`read_candidates`."""
    from ..corpus.files import atomic_write_bytes

    lines = [json.dumps(asdict(c), ensure_ascii=False) for c in candidates]
    atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))


def jsonl_rows(path: str | Path, what: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """``("file:line", object)`` of each row of a JSONL file; a missing file or a bad line is a
    :class:`BenchInputError` naming ``what`` the file holds."""
    path = Path(path)
    if not path.is_file():
        raise BenchInputError(f"{what} file {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, row in jsonl_objects(lines, lambda n, problem: BenchInputError(f"{path}:{n}: {problem}")):
        yield f"{path}:{n}", row
