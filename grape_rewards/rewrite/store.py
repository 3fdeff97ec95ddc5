"""The rewrites file: JSONL, one ``{"query_id", "rewrite", "raw", "model"}`` object per line, appended
batch by batch so a run can resume.

Each batch is written as whole lines in one ``write``, then flushed and fsynced, so a crash loses at
most the batch being written. A line cut short by a crash (the file does not end in a newline) is
trimmed when the file is opened again; every complete line must be valid JSON.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..jsonl import jsonl_objects

logger = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = ("query_id", "rewrite", "raw", "model")
"""The keys of every line of a rewrites file."""


class RewriteFileError(ValueError):
    """A rewrites file that cannot be read; the message names the file and the 1-based line."""


def trim_partial_line(path: str | Path) -> int:
    """Cut a trailing line that has no newline (left by a crash mid-write); return the bytes removed.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
    >>> _ = p.write_text('{"query_id": "1"}\\n{"query_id": "2", "rew')
    >>> trim_partial_line(p), p.read_text()
    (22, '{"query_id": "1"}\\n')
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        # Walk back in blocks to the last newline.
        end = size
        block = 1 << 16
        keep = 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        if keep == size:
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    logger.warning("%s: removed a partial last line (%d bytes) left by an interrupted run", path, size - keep)
    return size - keep


def read_rewrites(path: str | Path, *, allow_duplicates: bool = False) -> dict[str, dict[str, Any]]:
    """The rows of a rewrites file by ``query_id``, in file order; a trailing partial line is ignored.

    Raises :class:`RewriteFileError` (file and line named) for a complete line that is not a JSON object
    with a string ``query_id`` and a string ``rewrite``, or for a repeated ``query_id`` (unless
    ``allow_duplicates``: then the first row wins).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rewrites file not found: {path}")
    rows: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        data = f.read()
    lines = data.split("\n")
    if not data.endswith("\n"):
        lines = lines[:-1]  # a partial line from an interrupted run (or an empty file)
    for n, row in jsonl_objects(lines, lambda n, problem: RewriteFileError(f"{path}, line {n}: {problem}")):
        query_id, rewrite = row.get("query_id"), row.get("rewrite")
        if isinstance(query_id, int) and not isinstance(query_id, bool):
            query_id = str(query_id)
        if not isinstance(query_id, str) or not query_id:
            raise RewriteFileError(f"{path}, line {n}: 'query_id' must be a non-empty string, got {query_id!r}")
        if not isinstance(rewrite, str):
            raise RewriteFileError(f"{path}, line {n}: 'rewrite' must be a string, got {rewrite!r}")
        if query_id in rows:
            if allow_duplicates:
                continue
            raise RewriteFileError(f"{path}, line {n}: query_id {query_id!r} appears twice")
        rows[query_id] = {**row, "query_id": query_id}
    return rows


class RewriteWriter:
    """Appends rows to a rewrites file, one fsynced write per batch; knows which ids are done.

    Opening trims a partial last line and reads the ids already written, so a rerun skips them.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
    >>> with RewriteWriter(p) as w:
    ...     w.write_batch([{"query_id": "1", "rewrite": "a dog", "raw": "<answer>a dog</answer>", "model": "m"}])
    1
    >>> sorted(RewriteWriter(p).done)
    ['1']
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trim_partial_line(self.path)
        self.done: set[str] = set(read_rewrites(self.path, allow_duplicates=True)) if self.path.is_file() else set()
        self._file: Any = None

    def __enter__(self) -> RewriteWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_batch(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append rows (skipping ids already written), flush and fsync; return how many were written."""
        lines = []
        for row in rows:
            missing = [k for k in FIELDS if k not in row]
            if missing:
                raise ValueError(f"rewrite row {dict(row)!r} lacks {missing}")
            query_id = str(row["query_id"])
            if query_id in self.done:
                continue
            self.done.add(query_id)
            lines.append(json.dumps({k: row[k] for k in FIELDS}, ensure_ascii=False) + "\n")
        if not lines:
            return 0
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        self._file.write("".join(lines))
        self._file.flush()
        os.fsync(self._file.fileno())
        return len(lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
