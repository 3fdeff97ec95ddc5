"""Evaluation: Recall@K and CIRR metrics and submissions."""

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

__all__ = [
    "CIRR_RECALL_KS", "CIRR_SUBMISSION_TOP_K", "CIRR_SUBSET_KS", "cirr_submission", "recall_at_k", "subset_rank",
    "subset_ranks", "top_k_ids", "write_cirr_submissions",
]
