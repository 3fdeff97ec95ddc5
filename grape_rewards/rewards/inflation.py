"""Score-inflation statistics: does a reward raise the target's similarity, or everything's?

GRAPE's observation: optimising raw similarity makes rewrites that are similar to *every* item
(generic, keyword-stuffed), so the similarity to the target rises while the margin over the best
non-target, and hence the rank, does not improve. These summaries make that visible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

SUMMARY_KEYS: tuple[str, ...] = ("target_sim", "mean_sim", "best_nontarget_sim", "margin", "rank", "graded_rank",
                                  "recall_at_1", "recall_at_5", "recall_at_10", "reward")
"""The per-sample statistics :func:`inflation_summary` averages (``graded_rank`` only in the graded rank modes)."""


def summary_names(graded: bool = False) -> tuple[str, ...]:
    """The names :func:`inflation_summary` gives its figures (with ``mean_graded_rank`` when ``graded``).

    >>> summary_names()[:2], summary_names()[-1], "mean_graded_rank" in summary_names(graded=True)
    (('mean_target_sim', 'mean_mean_sim'), 'inflation_gap', True)
    """
    return (*(f"mean_{k}" for k in SUMMARY_KEYS if graded or k != "graded_rank"), "inflation_gap")


def inflation_summary(samples: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Batch means of the statistics that expose score inflation.

    ``inflation_gap`` is mean(target_sim) - mean(mean_sim): a rising target similarity with a rising
    corpus similarity (flat gap) is inflation, not retrieval. ``mean_graded_rank`` is there when the samples carry
    a graded rank (the margin and soft rank modes).

    >>> s = [{"target_sim": 0.8, "mean_sim": 0.6, "margin": -0.1, "rank": 5.0, "recall_at_1": 0.0},
    ...      {"target_sim": 0.6, "mean_sim": 0.2, "margin": 0.1, "rank": 1.0, "recall_at_1": 1.0}]
    >>> {k: round(v, 3) for k, v in inflation_summary(s).items()}["inflation_gap"]
    0.3
    """
    if not samples:
        return {}
    out: dict[str, float] = {}
    for key in SUMMARY_KEYS:
        values = [float(s[key]) for s in samples if key in s]
        if values:
            out[f"mean_{key}"] = math.fsum(values) / len(values)
    if "mean_target_sim" in out and "mean_mean_sim" in out:
        out["inflation_gap"] = out["mean_target_sim"] - out["mean_mean_sim"]
    return out
