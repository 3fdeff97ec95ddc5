"""grape-rewards: corpus-relative rank rewards from a frozen retriever, for GRPO training of query rewriters.

The public API is re-exported here lazily, so that ``import grape_rewards.adapters.verl`` (imported by
every verl reward worker) stays light: nothing imports torch until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS: dict[str, str] = {
    # retrievers
    "Retriever": "grape_rewards.retrievers",
    "RetrieverConfig": "grape_rewards.retrievers",
    "create_retriever": "grape_rewards.retrievers",
    "OpenCLIPRetriever": "grape_rewards.retrievers",
    "HFCLIPRetriever": "grape_rewards.retrievers",
    "TextEmbedder": "grape_rewards.retrievers",
    "ComposedRetriever": "grape_rewards.retrievers",
    # corpus
    "CorpusIndex": "grape_rewards.corpus",
    "CorpusSource": "grape_rewards.corpus",
    "build_index": "grape_rewards.corpus",
    "read_source": "grape_rewards.corpus",
    "corpus_rank": "grape_rewards.corpus",
    # rewards
    "RewardConfig": "grape_rewards.rewards",
    "FormatConfig": "grape_rewards.rewards",
    "rank_reward": "grape_rewards.rewards",
    "extract_rewrite": "grape_rewards.rewards",
    "inflation_summary": "grape_rewards.rewards",
    # scoring
    "RewardItem": "grape_rewards.scorer",
    "RewardScorer": "grape_rewards.scorer",
    "EnsembleScorer": "grape_rewards.ensemble",
    "AlarmConfig": "grape_rewards.rewards.config",
    "AlarmMonitor": "grape_rewards.alarms",
    "Label": "grape_rewards.labels",
    "parse_label": "grape_rewards.labels",
}

__all__ = [
    "AlarmConfig",
    "AlarmMonitor",
    "ComposedRetriever",
    "CorpusIndex",
    "CorpusSource",
    "EnsembleScorer",
    "FormatConfig",
    "HFCLIPRetriever",
    "Label",
    "OpenCLIPRetriever",
    "Retriever",
    "RetrieverConfig",
    "RewardConfig",
    "RewardItem",
    "RewardScorer",
    "TextEmbedder",
    "__version__",
    "build_index",
    "corpus_rank",
    "create_retriever",
    "extract_rewrite",
    "inflation_summary",
    "parse_label",
    "rank_reward",
    "read_source",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grape_rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .alarms import AlarmMonitor
    from .corpus import CorpusIndex, CorpusSource, build_index, corpus_rank, read_source
    from .ensemble import EnsembleScorer
    from .labels import Label, parse_label
    from .retrievers import (
        ComposedRetriever,
        HFCLIPRetriever,
        OpenCLIPRetriever,
        Retriever,
        RetrieverConfig,
        TextEmbedder,
        create_retriever,
    )
    from .rewards import FormatConfig, RewardConfig, extract_rewrite, inflation_summary, rank_reward
    from .rewards.config import AlarmConfig
    from .scorer import RewardItem, RewardScorer
