"""Pure reward maths: rank, rank shapes, format extraction, composites, score-inflation statistics."""

from .composite import RECALL_KS, sample_keys, score_sample
from .config import PARTS, FormatConfig, RewardConfig
from .format import Extraction, extract_rewrite, response_from_query, strip_special_tokens
from .inflation import inflation_summary
from .rank import (
    CUDA_CHUNK_ELEMENTS,
    DEFAULT_CHUNK_ELEMENTS,
    RankStats,
    ScanCounts,
    chunk_rows,
    column_sums,
    corpus_rank,
    default_chunk_elements,
    finish_rank,
    merge_counts,
    scan_counts,
    target_scores,
)
from .shapes import (
    RANK_SHAPES,
    linear_rank_reward,
    log_rank_reward,
    rank_reward,
    recall_at_k_reward,
    reciprocal_rank_reward,
    relative_rank_reward,
)

__all__ = [
    "CUDA_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS",
    "PARTS",
    "RANK_SHAPES",
    "RECALL_KS",
    "Extraction",
    "FormatConfig",
    "RankStats",
    "RewardConfig",
    "ScanCounts",
    "chunk_rows",
    "column_sums",
    "corpus_rank",
    "default_chunk_elements",
    "extract_rewrite",
    "finish_rank",
    "inflation_summary",
    "linear_rank_reward",
    "log_rank_reward",
    "merge_counts",
    "rank_reward",
    "recall_at_k_reward",
    "reciprocal_rank_reward",
    "relative_rank_reward",
    "response_from_query",
    "sample_keys",
    "scan_counts",
    "score_sample",
    "strip_special_tokens",
    "target_scores",
]
