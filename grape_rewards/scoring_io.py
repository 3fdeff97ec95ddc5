"""Offline batch scoring of a JSONL file through :class:`~grape_rewards.scorer.RewardScorer`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm.auto import tqdm

from .corpus.files import atomic_write_bytes
from .rewards.inflation import inflation_summary
from .scorer import RewardItem, RewardScorer

ITEM_FIELDS = set(RewardItem.model_fields)


def read_items(path: str | Path) -> tuple[list[dict[str, Any]], list[RewardItem]]:
    """Rows of a JSONL file and the :class:`RewardItem` each describes; errors name the line."""
    rows, items = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                items.append(RewardItem.model_validate({k: v for k, v in row.items() if k in ITEM_FIELDS}))
            except (json.JSONDecodeError, ValueError, ValidationError) as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
            rows.append(row)
    return rows, items


def score_jsonl(input_path: str | Path, output_path: str | Path, scorer: RewardScorer, batch_size: int = 256,
                progress: bool = True) -> dict[str, float]:
    """Score every row with ``scorer`` (one retriever, or an ensemble), write rows + results to ``output_path``
    atomically, return the batch summary."""
    rows, items = read_items(input_path)
    scorer.check_ids(items)
    results: list[dict[str, float]] = []
    for start in tqdm(range(0, len(items), batch_size), desc="score", unit="batch", disable=not progress):
        results.extend(scorer.score(items[start:start + batch_size]))
    lines = [json.dumps({**row, **res}, ensure_ascii=False) for row, res in zip(rows, results)]
    atomic_write_bytes(output_path, ("\n".join(lines) + "\n").encode("utf-8"))
    return {"count": float(len(results)), **inflation_summary(results)}
