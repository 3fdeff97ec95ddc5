"""Offline batch scoring of a JSONL file through :class:`~grape_rewards.scorer.RewardScorer`.

A row is refused exactly as the service refuses an item of ``/v1/rewards`` (the same
:func:`~grape_rewards.scorer.read_item` and :meth:`~grape_rewards.scorer.RewardScorer.validate`), named by
``file:line``; every row is checked before any is scored, and the output is written atomically, so a refused file
leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .corpus.files import atomic_write_bytes
from .framework_io import batch_summary
from .jsonl import jsonl_objects
from .scorer import ItemError, ItemRows, RewardItem, RewardScorer, read_item

TABULAR_SUFFIXES = frozenset({".csv", ".tsv"})


def read_items(path: str | Path, scorer: RewardScorer) -> tuple[list[dict[str, Any]], list[RewardItem], ItemRows]:
    """Rows of a JSONL file, the :class:`RewardItem` each describes and their corpus rows; errors name the line."""
    path = Path(path)

    def error(n: int, problem: str) -> ValueError:
        hint = ""
        if n == 1 and path.suffix.lower() in TABULAR_SUFFIXES:
            hint = f" ({path.name} looks like a {path.suffix[1:].upper()} file: --input takes JSON Lines, one object " \
                   "per line, e.g. {\"rewrite\": \"a dog\", \"target_ids\": [\"img_1\"]})"
        return ValueError(f"{path}:{n}: {problem}{hint}")

    rows, items, targets, excluded = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for n, row in jsonl_objects(f, error):
            where = f"{path}:{n}: row"
            try:
                item = read_item(row, where)
                t, e = scorer.validate_item(item, where)
            except ItemError as exc:
                raise ValueError(str(exc)) from None
            rows.append(row)
            items.append(item)
            targets.append(t)
            excluded.append(e)
    return rows, items, (targets, excluded)


def score_jsonl(input_path: str | Path, output_path: str | Path, scorer: RewardScorer, batch_size: int = 256,
                progress: bool = True) -> dict[str, float]:
    """Score every row with ``scorer`` (one retriever, or an ensemble), write rows + results to ``output_path``
    atomically, return the batch summary."""
    rows, items, (targets, excluded) = read_items(input_path, scorer)
    results: list[dict[str, float]] = []
    for start in tqdm(range(0, len(items), batch_size), desc="score", unit="batch", disable=not progress):
        end = start + batch_size
        results.extend(scorer.score_batch(items[start:end], (targets[start:end], excluded[start:end])).samples)
    lines = [json.dumps({**row, **res}, ensure_ascii=False) for row, res in zip(rows, results)]
    atomic_write_bytes(output_path, ("\n".join(lines) + "\n").encode("utf-8"))
    return batch_summary(results)
