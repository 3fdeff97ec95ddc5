"""Evaluation: Recall@K and CIRR metrics and submissions; benchmark evaluation of original queries and rewrites;
the score-inflation report.

The metrics load eagerly (numpy only); the evaluation and report names load on first use, so importing
this package (as the CLI does to build its parser) does not import torch or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from .metrics import (
    CIRR_RECALL_KS,
    CIRR_SUBMISSION_TOP_K,
    CIRR_SUBSET_KS,
    cirr_submission,
    recall_at_k,
    subset_rank,
    subset_ranks,
    top_k_ids,
    write_cirr_submissions,
)

_LAZY: dict[str, str] = {
    "ENSEMBLE_RECALL": "evaluate", "EvalReport": "evaluate", "MethodResult": "evaluate", "RECALL_KS": "evaluate",
    "RewriteSet": "evaluate", "encode_queries": "evaluate", "ensemble_recall_at_k": "evaluate",
    "evaluate": "evaluate", "evaluate_ensemble": "evaluate", "prepare_index": "evaluate",
    "write_eval_outputs": "evaluate",
    "SimilarityDistribution": "inflation_report", "from_rank_stats": "inflation_report",
    "from_scored_jsonl": "inflation_report", "inflation_markdown": "inflation_report",
    "plot_inflation": "inflation_report", "summarize": "inflation_report",
    "write_inflation_report": "inflation_report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CIRR_RECALL_KS", "CIRR_SUBMISSION_TOP_K", "CIRR_SUBSET_KS", "ENSEMBLE_RECALL", "RECALL_KS", "EvalReport",
    "MethodResult", "RewriteSet", "SimilarityDistribution", "cirr_submission", "encode_queries",
    "ensemble_recall_at_k", "evaluate", "evaluate_ensemble", "from_rank_stats", "from_scored_jsonl",
    "inflation_markdown", "plot_inflation", "prepare_index", "recall_at_k", "subset_rank", "subset_ranks",
    "summarize", "top_k_ids", "write_cirr_submissions", "write_eval_outputs", "write_inflation_report",
]
