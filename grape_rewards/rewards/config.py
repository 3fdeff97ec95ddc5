"""Reward configuration: pydantic models, loadable from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .graded_rank import RankMode

PARTS: tuple[str, ...] = ("rank", "similarity", "format")
"""Named parts of the composite reward (see :func:`grape_rewards.rewards.composite.score_sample`)."""


DEFAULT_TEMPERATURES: dict[str, float] = {"margin": 0.01, "soft": 0.02}
"""The similarity scale of each graded rank mode when ``temperature`` is not set: chosen on the reward benchmark's
dev split, before its held-out run (benchmarks/results/reward-bench-dev.json)."""


class FormatConfig(BaseModel):
    """How the rewrite is read from a completion, and what a bad format costs."""

    model_config = ConfigDict(extra="forbid")

    answer_tag: str = "answer"
    """The rewrite is the content of the last ``<answer_tag>...</answer_tag>`` pair, when present."""
    require_answer_tag: bool = False
    """If true, a completion without the answer tags is ``missing``."""
    max_chars: int = Field(default=1000, ge=1)
    """Rewrites longer than this are ``overlong``: still scored, minus ``overlong_penalty``."""
    invalid_reward: float = -1.0
    """The whole reward of an ``empty`` or ``missing`` rewrite (nothing to retrieve with)."""
    overlong_penalty: float = 0.5
    truncation_penalty: float = 0.0
    """Subtracted when the retriever's tokenizer had to truncate the rewrite."""


class AlarmConfig(BaseModel):
    """Reward-hacking alarms: thresholds on rolling windows of scored samples (see :mod:`grape_rewards.alarms`).

    Each alarm is checked after every scored batch on the last ``window`` samples (and, for the two trends, against
    the ``window`` samples before them). Size the window to a few training steps' samples.

    >>> AlarmConfig().window, AlarmConfig().max_format_failure_share
    (1024, 0.2)
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Watch the scored samples (about 20 µs of CPU per sample, see benchmarks/README.md)."""
    window: int = Field(default=1024, ge=16)
    """Samples per window."""
    inflation_rise: float = Field(default=0.03, gt=0.0)
    """similarity_inflation: mean target similarity and mean corpus similarity both rose by at least this over the
    window before, ..."""
    flat_margin: float = Field(default=0.01, ge=0.0)
    """... while the mean margin (target minus best non-target similarity) moved by less than this ..."""
    flat_reward: float = Field(default=0.02, ge=0.0)
    """... and the mean rank reward rose by less than this (also the "flat reward" of length_blowup)."""
    length_growth: float = Field(default=0.25, gt=0.0)
    """length_blowup: the mean rewrite length in tokens grew by this fraction over the window before (reward flat),
    ..."""
    max_long_share: float = Field(default=0.2, gt=0.0, le=1.0)
    """... or more than this share of the window's rewrites are overlong or truncated by the retriever's tokenizer."""
    group_duplicate_jaccard: float = Field(default=0.9, gt=0.0, le=1.0)
    """collapse: a rewrite duplicates a sibling (same query_id, else original query, else targets) when their word
    sets overlap by at least this Jaccard index, ..."""
    max_group_duplicate_share: float = Field(default=0.5, gt=0.0, le=1.0)
    """... and collapse is on when more than this share of the window's rewrites duplicate a sibling, ..."""
    min_distinct_share: float = Field(default=0.1, ge=0.0, le=1.0)
    """... or when distinct rewrites / rewrites in the window falls below this."""
    max_keyword_list_share: float = Field(default=0.2, gt=0.0, le=1.0)
    """keyword_stuffing: more than this share of the window's rewrites are keyword lists
    (:func:`grape_rewards.alarms.is_keyword_list`)."""
    max_format_failure_share: float = Field(default=0.2, gt=0.0, le=1.0)
    """format_failures: more than this share of the window's completions had no rewrite (empty or missing)."""


class RewardConfig(BaseModel):
    """The reward: ``sum_k weights[k] * part_k`` minus penalties; see the README for the formulas.

    >>> RewardConfig().shape, RewardConfig().weights
    ('log', {'rank': 1.0, 'similarity': 0.0, 'format': 0.0})
    >>> RewardConfig.preset("similarity").weights["similarity"]
    1.0
    """

    model_config = ConfigDict(extra="forbid")

    shape: Literal["linear", "reciprocal", "log", "loglinear", "recall@k"] = "log"
    k: int = Field(default=10, ge=1)
    """The k of the ``recall@k`` shape."""
    rank_mode: RankMode = "hard"
    """What the shape is applied to: ``hard``, the plain rank; ``margin``, the rank graded by the target's gaps to
    its neighbours (at rank 1 its margin over the best non-target); ``soft``, a sigmoid soft rank
    (:mod:`grape_rewards.rewards.graded_rank`)."""
    temperature: float | None = Field(default=None, gt=0.0)
    """The similarity scale of ``margin`` (at rank 1) and ``soft``; None: the mode's default
    (:data:`DEFAULT_TEMPERATURES`)."""
    relative: bool = False
    """Reward shape(rank of rewrite) - shape(rank of the original query) instead of the shape itself."""
    weights: dict[str, float] = Field(default_factory=lambda: {"rank": 1.0, "similarity": 0.0, "format": 0.0})
    format: FormatConfig = Field(default_factory=FormatConfig)
    ensemble: Literal["mean", "min"] = "mean"
    """With several retrievers (one index each, same ids): the rank part is the mean or the minimum of their rank
    parts (:func:`~grape_rewards.rewards.composite.ensemble_rank_part`)."""
    alarms: AlarmConfig = Field(default_factory=AlarmConfig)
    """Reward-hacking alarms over the scored samples; they never change a reward."""

    @model_validator(mode="after")
    def _graded_shape(self) -> RewardConfig:
        if self.rank_mode != "hard" and self.shape == "recall@k":
            raise ValueError(f"rank_mode {self.rank_mode!r} grades the rank with real numbers; the recall@k shape is a "
                             "step at k: choose linear, reciprocal, log or loglinear, or rank_mode 'hard'")
        return self

    @property
    def rank_temperature(self) -> float:
        """The temperature the graded rank uses: ``temperature``, else the mode's default.

        >>> RewardConfig(rank_mode="margin").rank_temperature == DEFAULT_TEMPERATURES["margin"]
        True
        """
        if self.temperature is not None:
            return self.temperature
        return DEFAULT_TEMPERATURES.get(self.rank_mode, 1.0)

    @field_validator("weights")
    @classmethod
    def _known_parts(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown reward part(s) {unknown}; known parts: {list(PARTS)}")
        return {part: float(weights.get(part, 0.0)) for part in PARTS}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RewardConfig:
        """``rank`` (GRAPE's corpus-relative rank, the default) or ``similarity`` (the raw-similarity baseline)."""
        if name == "rank":
            return cls(**overrides)
        if name == "similarity":
            return cls(weights={"rank": 0.0, "similarity": 1.0, "format": 0.0}, **overrides)
        raise ValueError(f"unknown reward preset {name!r}; choose 'rank' or 'similarity'")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RewardConfig:
        """Load from a YAML mapping with this model's fields."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of reward settings, got {type(data).__name__}")
        return cls.model_validate(data)
