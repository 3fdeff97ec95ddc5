"""What the callers send and take back, transport aside: shared by the service and the in-process adapters.

- OpenRLHF sends ``(query, prompt, label)`` per sample (:func:`openrlhf_item`) and takes back
  ``{"rewards", "scores", "extra_logs"}`` (:func:`openrlhf_answer`);
- the native API takes back ``{"results", "keys", "summary"}`` (:func:`native_answer`), the summary being
  :func:`batch_summary`, which ``grape-rewards score`` prints too.

Pure functions of scored samples: the scoring itself, and every rule of it, is
:class:`~grape_rewards.scorer.RewardScorer`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .labels import Label
from .rewards.config import RewardConfig
from .rewards.format import response_from_query
from .rewards.inflation import inflation_summary
from .rewards.shapes import rank_reward
from .scorer import RewardItem

OPENRLHF_LOG_KEYS: tuple[str, ...] = ("rank", "recall_at_1", "recall_at_5", "recall_at_10", "target_sim", "mean_sim",
                                      "margin", "format_ok", "truncated")
"""Per-sample statistics returned in ``extra_logs`` (OpenRLHF logs the mean of each), plus ``inflation_gap`` and
the keys of :data:`EXTRA_LOG_PREFIXES`."""
EXTRA_LOG_PREFIXES: tuple[str, ...] = ("retriever_", "alarm_")
"""Also in ``extra_logs`` when the samples have them: an ensemble's ``retriever_<j>_rank`` / ``retriever_<j>_part_rank``
and the alarm flags ``alarm_<name>`` (:data:`grape_rewards.alarms.ALARM_KEYS`)."""


def finite(x: float) -> float:
    """``x``, or 0.0 for NaN and infinities (never expected), which no framework and no JSON encoder takes.

    >>> finite(0.5), finite(float("nan"))
    (0.5, 0.0)
    """
    return x if math.isfinite(x) else 0.0


def openrlhf_item(query: str, prompt: str | None, label: Label) -> RewardItem:
    """The reward item of one OpenRLHF sample: the response recovered from ``query`` (the templated prompt and the
    response) and where the label says the target is. Built without validation: a parsed label is already valid.

    >>> openrlhf_item("<|im_start|>assistant\\na dog<|im_end|>", "", Label(target_ids=["c1"])).completion
    'a dog<|im_end|>'
    """
    return RewardItem.model_construct(
        completion=response_from_query(query, prompt), rewrite=None, target_ids=label.target_ids,
        excluded_ids=label.excluded_ids, reference_id=label.reference_id, query_id=label.query_id,
        original_query=label.original_query)


def openrlhf_answer(samples: Sequence[dict[str, float]], config: RewardConfig) -> dict[str, Any]:
    """``{"rewards", "scores", "extra_logs"}``; ``scores`` is the rank shape in [0, 1] (0 for an unscored sample,
    and the rewrite's own rank, not the change, in the relative mode)."""
    rewards = [finite(s["reward"]) for s in samples]
    scores = [min(1.0, max(0.0, rank_reward(int(s["rank"]), int(s["n"]), config.shape, config.k)))
              if s["scored"] == 1.0 else 0.0 for s in samples]
    logs: dict[str, list[float]] = {key: [finite(s[key]) for s in samples] for key in OPENRLHF_LOG_KEYS}
    logs["inflation_gap"] = [finite(s["target_sim"] - s["mean_sim"]) for s in samples]
    if config.relative:
        logs["original_rank"] = [s["original_rank"] for s in samples]
    for key in samples[0] if samples else ():  # an ensemble's per-retriever ranks, the reward-hacking alarm flags
        if key.startswith(EXTRA_LOG_PREFIXES):
            logs[key] = [finite(s[key]) for s in samples]
    return {"rewards": rewards, "scores": scores, "extra_logs": logs}


def batch_summary(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """The sample count and the score-inflation means of a batch (:func:`~grape_rewards.rewards.inflation_summary`).

    >>> batch_summary([])
    {'count': 0.0}
    """
    return {"count": float(len(samples)), **inflation_summary(samples)}


def native_answer(samples: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, Any]:
    """``{"results", "keys", "summary"}`` of the native API (non-finite values as 0.0)."""
    results = [{k: finite(v) for k, v in s.items()} for s in samples]
    return {"results": results, "keys": list(keys), "summary": batch_summary(results)}
