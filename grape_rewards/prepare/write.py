"""Write the training files: OpenRLHF JSONL, verl parquet, TRL JSONL (each atomically)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .rows import TrainingQuery, openrlhf_row, trl_row, verl_row

FORMATS: tuple[str, ...] = ("openrlhf", "verl", "trl")
"""Output formats, each written to ``<out>/<format>/<split>.<ext>``."""
EXTENSIONS: dict[str, str] = {"openrlhf": "jsonl", "verl": "parquet", "trl": "jsonl"}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write one JSON object per line (UTF-8 as is); returns the number of rows."""
    from ..corpus.files import atomic_write  # here: the corpus layer imports torch, and the CLI parser imports this

    rows = list(rows)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(Path(path), write)
    return len(rows)


def write_parquet(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write rows as a parquet table (needs ``pyarrow``); returns the number of rows."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("writing verl parquet needs pyarrow: pip install pyarrow") from None
    from ..corpus.files import atomic_write

    rows = list(rows)
    if not rows:
        raise ValueError("no rows to write")
    table = pa.Table.from_pylist(rows)
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))
    return len(rows)


@dataclass
class PrepareSummary:
    """What :func:`write_training_data` wrote."""

    rows: int
    dropped_without_targets: int
    with_images: bool
    files: dict[str, str] = field(default_factory=dict)
    """Format -> path of the written file."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_training_data(queries: Sequence[TrainingQuery], out_dir: str | Path, split: str = "train",
                        formats: Sequence[str] = FORMATS, images: bool | None = None, system: bool = True,
                        data_source: str = "grape", dropped: int = 0) -> PrepareSummary:
    """Write ``queries`` for each framework in ``formats`` under ``out_dir/<format>/<split>.<ext>``.

    Args:
        images: show each query's reference image to the policy (VLM rows); default: when every query has one.
            True with a query lacking its image file path is an error.
        system: keep the system message (False folds it into the user message).
        data_source: verl's ``data_source`` and OpenRLHF's ``datasource`` (metrics are grouped by it).
        dropped: queries left out earlier (no targets), reported in the summary.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if not queries:
        raise ValueError("no queries with known targets to write (test splits hide their labels)")
    have_images = all(q.reference_image for q in queries)
    if images is None:
        images = have_images
    elif images and not have_images:
        missing = next(q for q in queries if not q.reference_image)
        raise ValueError(f"query {missing.query_id!r} has no reference image file; drop --images")
    out_dir = Path(out_dir)
    summary = PrepareSummary(rows=len(queries), dropped_without_targets=dropped, with_images=images)
    for fmt in formats:
        path = out_dir / fmt / f"{split}.{EXTENSIONS[fmt]}"
        if fmt == "openrlhf":
            write_jsonl((openrlhf_row(q, images, system, data_source) for q in queries), path)
        elif fmt == "verl":
            write_parquet((verl_row(q, i, images, system, data_source) for i, q in enumerate(queries)), path)
        else:
            write_jsonl((trl_row(q, images, system) for q in queries), path)
        summary.files[fmt] = str(path)
    return summary
