"""Pure reward maths, importable without torch: rank shapes, format extraction, composites, inflation statistics."""

from .composite import RECALL_KS, sample_keys, score_sample
from .config import PARTS, FormatConfig, RewardConfig
from .format import Extraction, extract_rewrite, response_from_query, strip_special_tokens
from .inflation import inflation_summary
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
    "PARTS",
    "RANK_SHAPES",
    "RECALL_KS",
    "Extraction",
    "FormatConfig",
    "RewardConfig",
    "extract_rewrite",
    "inflation_summary",
    "linear_rank_reward",
    "log_rank_reward",
    "rank_reward",
    "recall_at_k_reward",
    "reciprocal_rank_reward",
    "relative_rank_reward",
    "response_from_query",
    "sample_keys",
    "score_sample",
    "strip_special_tokens",
]
