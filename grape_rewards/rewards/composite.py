"""The per-sample composite reward: weighted named parts, penalties, and the statistics logged beside it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import RewardConfig
from .format import Extraction
from .graded_rank import graded_rank
from .shapes import rank_reward

RECALL_KS: tuple[int, ...] = (1, 5, 10)
_RECALL_KEYS = tuple((k, f"recall_at_{k}") for k in RECALL_KS)


def sample_keys(config: RewardConfig) -> tuple[str, ...]:
    """The keys every scored sample carries, in order (fixed for a given config).

    >>> sample_keys(RewardConfig())[:3]
    ('reward', 'part_rank', 'part_similarity')
    """
    keys = ["reward", "part_rank", "part_similarity", "part_format", "rank", "n"]
    if config.rank_mode != "hard":
        keys += ["graded_rank"]
    keys += [f"recall_at_{k}" for k in RECALL_KS]
    keys += ["target_sim", "mean_sim", "best_nontarget_sim", "margin", "format_ok", "truncated", "num_tokens", "scored"]
    if config.relative:
        keys += ["original_rank"]
    return tuple(keys)


def ensemble_rank_part(parts: Sequence[float], how: str) -> float:
    """The rank part of an ensemble of retrievers: the mean (``math.fsum / k``) or the minimum of theirs.

    >>> ensemble_rank_part([1.0, 0.5], "mean"), ensemble_rank_part([1.0, 0.5], "min")
    (0.75, 0.5)
    """
    if not parts:
        raise ValueError("an ensemble needs at least one retriever's rank part")
    if how == "mean":
        return math.fsum(parts) / len(parts)
    if how == "min":
        return min(parts)
    raise ValueError(f"unknown ensemble rule {how!r}; choose 'mean' or 'min'")


def score_sample(
    config: RewardConfig,
    extraction: Extraction,
    rank: int,
    n: int,
    target_sim: float,
    mean_sim: float,
    best_nontarget_sim: float,
    num_tokens: int = 0,
    truncated: bool = False,
    original_rank: float | None = None,
    part_rank: float | None = None,
    gap_above: float = math.inf,
    gap_below: float = math.inf,
    soft_count: float | None = None,
    graded: float | None = None,
) -> dict[str, float]:
    """Combine one sample's rank statistics and format into the reward and its logged components.

    reward = w_rank * part_rank + w_similarity * target_sim + w_format * format_ok
             - overlong_penalty * overlong - truncation_penalty * truncated,
    where part_rank = shape(rho) (or shape(rho) - shape(original_rank) in the relative mode) and rho is the rank as
    ``config.rank_mode`` grades it (:func:`~grape_rewards.rewards.graded_rank.graded_rank`: the plain rank, or graded
    by ``gap_above`` / ``gap_below`` (margin) or ``soft_count`` (soft)), unless ``part_rank`` is given (an
    ensemble's, :func:`ensemble_rank_part`; ``rank``, the similarities and ``graded``, the graded rank when the caller
    has it, are then the logged ones). ``original_rank`` is the original query's rank graded the same way. An empty
    or missing rewrite gets ``invalid_reward`` and the worst statistics (rank = n); ``scored`` says which of the two
    a sample got (1.0: ranked, 0.0: the format penalty).

    >>> from grape_rewards.rewards.format import Extraction
    >>> out = score_sample(RewardConfig(), Extraction("a dog", "ok"), rank=3, n=100,
    ...                    target_sim=0.5, mean_sim=0.1, best_nontarget_sim=0.6)
    >>> out["reward"], out["margin"], out["recall_at_5"]
    (0.5, -0.09999999999999998, 1.0)
    """
    fmt = config.format
    if config.relative and original_rank is None:
        raise ValueError("the relative reward needs the original query's rank")
    scorable = extraction.scorable
    if not scorable:
        rank, target_sim, mean_sim, best_nontarget_sim, num_tokens, truncated = n, 0.0, 0.0, 0.0, 0, False
        gap_above, gap_below, soft_count, graded = 0.0, math.inf, float(n - 1), None
    if graded is None:
        graded = graded_rank(config.rank_mode, rank, n, gap_above=gap_above, gap_below=gap_below,
                             soft_count=soft_count, temperature=config.rank_temperature)
    if part_rank is None:
        part_rank = rank_reward(graded, n, config.shape, config.k)
        if config.relative:
            assert original_rank is not None
            part_rank -= rank_reward(original_rank, n, config.shape, config.k)
    part_format = 1.0 if extraction.ok else 0.0
    w = config.weights
    if scorable:
        reward = w["rank"] * part_rank + w["similarity"] * target_sim + w["format"] * part_format
        if extraction.status == "overlong":
            reward -= fmt.overlong_penalty
        if truncated:
            reward -= fmt.truncation_penalty
    else:
        reward = fmt.invalid_reward
    out = {
        "reward": float(reward),
        "part_rank": float(part_rank),
        "part_similarity": float(target_sim),
        "part_format": part_format,
        "rank": float(rank),
        "n": float(n),
    }
    if config.rank_mode != "hard":
        out["graded_rank"] = graded
    for k, key in _RECALL_KEYS:
        out[key] = 1.0 if scorable and rank <= k else 0.0
    out["target_sim"] = float(target_sim)
    out["mean_sim"] = float(mean_sim)
    out["best_nontarget_sim"] = float(best_nontarget_sim)
    out["margin"] = float(target_sim - best_nontarget_sim)
    out["format_ok"] = part_format
    out["truncated"] = 1.0 if truncated else 0.0
    out["num_tokens"] = float(num_tokens)
    out["scored"] = 1.0 if scorable else 0.0
    if config.relative:
        out["original_rank"] = float(original_rank)  # type: ignore[arg-type]
    return out
