"""The common schema every benchmark loader yields, and the helpers loaders share to read files strictly.

A benchmark is a corpus (the items the retriever ranks: images, or texts for text corpora) and a set of
queries, each naming the corpus ids of its true target(s). Loaders stream both from the dataset's own
release files; anything malformed raises :class:`DataFormatError`, whose message names the file, the
1-based line (or record index) and what is wrong.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..jsonl import jsonl_objects

Task = Literal["multilingual", "longform", "composed", "text"]
"""``multilingual``: non-English caption -> image; ``longform``: long text -> image;
``composed``: reference image + modification text -> image; ``text``: any query -> a text passage (a text retriever's
corpus)."""

TASKS: tuple[str, ...] = ("multilingual", "longform", "composed", "text")
IMAGE_TASKS: tuple[str, ...] = ("multilingual", "longform", "composed")
"""The tasks whose corpus is images (their prompts ask for a CLIP caption)."""

PathLike = str | Path

T = TypeVar("T")


class DataFormatError(ValueError):
    """A dataset file does not match its release format.

    The message always names the file and, where it applies, the 1-based line (JSONL, TSV) or the
    1-based record index (a JSON list or mapping), followed by what is wrong::

        /data/cirr/captions/cap.rc2.val.json, record 3: missing key 'caption'
    """

    def __init__(self, path: PathLike, message: str, *, line: int | None = None, record: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.record = record
        self.reason = message
        where = self.path
        if line is not None:
            where += f", line {line}"
        if record is not None:
            where += f", record {record}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class CorpusItem:
    """One item the retriever ranks: an image file, or a text for text corpora."""

    id: str
    """Unique within the benchmark's corpus; queries name their targets by it."""
    image: str | None = None
    """Path of the image file."""
    text: str | None = None
    """The item's text, for text corpora."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"CorpusItem.id must be a non-empty string, got {self.id!r}")
        if self.image is None and self.text is None:
            raise ValueError(f"CorpusItem {self.id!r} has neither an image nor a text")


@dataclass(frozen=True)
class Query:
    """One query and the corpus ids of its true target(s)."""

    query_id: str
    text: str
    """The query text (for ``composed`` queries, the modification text)."""
    target_ids: tuple[str, ...]
    """Corpus ids of the true targets; empty where the release hides the labels (test splits)."""
    reference_id: str | None = None
    """CIRR: the reference image's corpus id. Excluded from the ranking; fused into the composed query."""
    subset_ids: tuple[str, ...] | None = None
    """CIRR: the query's ``img_set.members`` minus the reference (the Recall_subset candidates)."""
    language: str | None = None
    split: str | None = None
    task: Task = "multilingual"

    def __post_init__(self) -> None:
        if not isinstance(self.query_id, str) or not self.query_id:
            raise ValueError(f"Query.query_id must be a non-empty string, got {self.query_id!r}")
        if not isinstance(self.target_ids, tuple) or not all(isinstance(t, str) for t in self.target_ids):
            raise ValueError(f"Query {self.query_id!r}: target_ids must be a tuple of strings")
        if self.subset_ids is not None and not isinstance(self.subset_ids, tuple):
            raise ValueError(f"Query {self.query_id!r}: subset_ids must be a tuple or None")
        if self.task not in TASKS:
            raise ValueError(f"Query {self.query_id!r}: task must be one of {TASKS}, got {self.task!r}")

    @property
    def excluded_ids(self) -> tuple[str, ...]:
        """Corpus ids left out of this query's ranking (the CIRR reference image, if any)."""
        return (self.reference_id,) if self.reference_id is not None else ()


class Benchmark(ABC):
    """A retrieval benchmark: a corpus and queries, both streamed lazily from the release files.

    Subclasses set ``name`` (the registry name) and ``task``, and implement :meth:`corpus` and
    :meth:`queries` as generators that read files as they go. Each call starts a fresh pass.
    """

    name: str
    task: Task

    def __init__(self, root: PathLike, split: str) -> None:
        self.root = Path(root)
        self.split = split

    @abstractmethod
    def corpus(self) -> Iterator[CorpusItem]:
        """Yield every corpus item once, in a stable order."""

    @abstractmethod
    def queries(self) -> Iterator[Query]:
        """Yield every query once, in a stable order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r})"


# ----------------------------------------------------------------------------------------------
# Strict readers shared by the loaders. Every failure becomes a DataFormatError with file + line.
# ----------------------------------------------------------------------------------------------


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise :class:`DataFormatError` saying which file is missing."""
    if not path.is_file():
        raise DataFormatError(path, f"missing {what} file")
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (1-based line numbers)."""
    require_file(path, "JSONL")
    with open(path, encoding="utf-8") as f:
        yield from jsonl_objects(f, lambda n, problem: DataFormatError(path, problem, line=n))


def read_json(path: Path) -> Any:
    """Load a whole JSON file; a syntax error names the file and the line it occurs on."""
    require_file(path, "JSON")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"invalid JSON ({e.msg} at column {e.colno})", line=e.lineno) from None


def get_field(
    obj: dict[str, Any],
    key: str,
    kind: type[T] | tuple[type, ...],
    path: Path,
    *,
    line: int | None = None,
    record: int | None = None,
) -> T:
    """``obj[key]``, checked to be an instance of ``kind`` (``bool`` never passes for ``int``)."""
    if key not in obj:
        raise DataFormatError(path, f"missing key {key!r}", line=line, record=record)
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataFormatError(
            path, f"key {key!r} must be {names}, got {type(value).__name__}", line=line, record=record
        )
    return value


def as_id(value: Any, what: str, path: Path, *, line: int | None = None, record: int | None = None) -> str:
    """An id given as a JSON integer or non-empty string, as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
        raise DataFormatError(path, f"{what} must be an integer or a non-empty string, got {value!r}",
                              line=line, record=record)
    return str(value)


def str_list(value: Any, what: str, path: Path, *, line: int | None = None, record: int | None = None) -> list[str]:
    """A JSON list of strings (or a single string, taken as a one-element list)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(path, f"{what} must be a list of strings", line=line, record=record)
    return list(value)
