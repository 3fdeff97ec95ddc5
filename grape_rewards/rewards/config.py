"""Reward configuration: pydantic models, loadable from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

PARTS: tuple[str, ...] = ("rank", "similarity", "format")
"""Named parts of the composite reward (see :func:`grape_rewards.rewards.composite.score_sample`)."""


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


class RewardConfig(BaseModel):
    """The reward: ``sum_k weights[k] * part_k`` minus penalties; see the README for the formulas.

    >>> RewardConfig().shape, RewardConfig().weights
    ('log', {'rank': 1.0, 'similarity': 0.0, 'format': 0.0})
    >>> RewardConfig.preset("similarity").weights["similarity"]
    1.0
    """

    model_config = ConfigDict(extra="forbid")

    shape: Literal["linear", "reciprocal", "log", "recall@k"] = "log"
    k: int = Field(default=10, ge=1)
    """The k of the ``recall@k`` shape."""
    relative: bool = False
    """Reward shape(rank of rewrite) - shape(rank of the original query) instead of the shape itself."""
    weights: dict[str, float] = Field(default_factory=lambda: {"rank": 1.0, "similarity": 0.0, "format": 0.0})
    format: FormatConfig = Field(default_factory=FormatConfig)

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
