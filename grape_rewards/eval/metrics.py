"""Recall@K from 1-based ranks, CIRR's Recall_subset rank, and CIRR test-server submission files.

Ranks follow the convention of :mod:`grape_rewards.corpus.rank`: the rank of a target is
``1 + |{candidates c, c not a target, c not excluded : s(q, c) > s(q, target)}|`` -- ties count in the
target's favour, and excluded items (CIRR's reference image) are never candidates.

CIRR protocol (``shared/protocols.md``): Recall@{1,5,10,50} ranks the split's WHOLE gallery with the
query's reference image removed; Recall_subset@{1,2,3} ranks only ``img_set.members`` minus the
reference. Test labels are hidden: predictions go to the CIRR server as
``{"version": "rc2", "metric": "recall" | "recall_subset", "<pairid>": [ids, ...]}``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

CIRR_RECALL_KS: tuple[int, ...] = (1, 5, 10, 50)
"""The K of CIRR's Recall@K (whole gallery, reference removed)."""
CIRR_SUBSET_KS: tuple[int, ...] = (1, 2, 3)
"""The K of CIRR's Recall_subset@K (the query's image set, reference removed)."""
CIRR_SUBMISSION_TOP_K: dict[str, int] = {"recall": 50, "recall_subset": 3}
"""How many ranked ids the CIRR server takes per query, by metric."""

CirrMetric = Literal["recall", "recall_subset"]
PairId = int | str


def recall_at_k(ranks: Iterable[int] | np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent (0-100) from 1-based ranks, plus ``"mean"``: the mean over the listed K.

    >>> recall_at_k([1, 2, 6, 11])
    {'R@1': 25.0, 'R@5': 50.0, 'R@10': 75.0, 'mean': 50.0}
    >>> recall_at_k([1, 3], ks=(1, 2, 3))
    {'R@1': 50.0, 'R@2': 50.0, 'R@3': 100.0, 'mean': 66.66666666666667}
    """
    r = np.asarray(ranks if hasattr(ranks, "__array__") or isinstance(ranks, (list, tuple)) else list(ranks))
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D sequence, got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.number) or np.issubdtype(r.dtype, np.bool_):
        raise ValueError(f"ranks must be numbers, got dtype {r.dtype}")
    if not np.all(np.isfinite(r)) or np.any(r != np.round(r)) or np.any(r < 1):
        raise ValueError("ranks must be integers >= 1 (1-based)")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has duplicates: {ks}")
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out["mean"] = float(np.mean([out[f"R@{k}"] for k in ks]))
    return out


def expected_recall_at_k(above: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    """Per query, the probability that the target is in the top ``k`` when ties are broken uniformly at random.

    ``above`` items score strictly higher than the target and ``tied`` others score the same, so the target's position
    is uniform over ``above + 1 .. above + tied + 1``; P(position <= k) = clip((k - above) / (tied + 1), 0, 1).

    >>> expected_recall_at_k(np.array([0, 0, 2, 9]), np.array([0, 3, 1, 0]), 1).tolist()
    [1.0, 0.25, 0.0, 0.0]
    """
    above, tied = np.asarray(above, dtype=np.float64), np.asarray(tied, dtype=np.float64)
    return np.clip((k - above) / (tied + 1.0), 0.0, 1.0)


def expected_reciprocal_rank(above: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """Per query, the expected 1 / position of the target under a uniform tie-break (see :func:`expected_recall_at_k`):
    the mean of 1 / p over p = above + 1 .. above + tied + 1.

    >>> expected_reciprocal_rank(np.array([0, 1, 0]), np.array([0, 0, 1])).tolist()
    [1.0, 0.5, 0.75]
    """
    above = np.asarray(above, dtype=np.int64)
    tied = np.asarray(tied, dtype=np.int64)
    if above.size == 0:
        return np.zeros(0)
    if np.any(above < 0) or np.any(tied < 0):
        raise ValueError("above and tied must be counts >= 0")
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int((above + tied).max()) + 2))])
    spread = (harmonic[above + tied + 1] - harmonic[above]) / (tied + 1.0)
    return np.where(tied == 0, 1.0 / (above + 1.0), spread)  # no ties: exactly 1 / position


def subset_rank(scores: Mapping[str, float], target_id: str, reference_id: str | None = None) -> int:
    """The 1-based rank of the target among a CIRR query's subset (Recall_subset).

    ``scores`` maps each subset member to the query's similarity to it; it must include the target.
    ``reference_id``, if given, is dropped even if it appears in ``scores`` (the reference is never a
    candidate; keeping it would push the target down whenever the query resembles its reference).
    Only strictly higher scores push the target down.

    >>> subset_rank({"a": 0.9, "t": 0.5, "b": 0.5, "c": 0.1}, "t")
    2
    >>> subset_rank({"ref": 0.99, "t": 0.8, "b": 0.2}, "t", reference_id="ref")
    1
    """
    if target_id == reference_id:
        raise ValueError(f"target {target_id!r} is the reference image")
    if target_id not in scores:
        raise ValueError(f"target {target_id!r} has no score; scores must cover the target and the subset")
    values = {k: float(v) for k, v in scores.items()}
    if any(math.isnan(v) for v in values.values()):
        raise ValueError("scores contain NaN")
    t = values[target_id]
    return 1 + sum(1 for k, v in values.items() if k != target_id and k != reference_id and v > t)


def subset_ranks(
    scores: Sequence[Mapping[str, float]],
    target_ids: Sequence[str],
    reference_ids: Sequence[str | None] | None = None,
) -> list[int]:
    """:func:`subset_rank` for each query; feed the result to ``recall_at_k(..., ks=CIRR_SUBSET_KS)``.

    >>> subset_ranks([{"t": 0.2, "x": 0.3}, {"t": 0.4, "x": 0.3}], ["t", "t"])
    [2, 1]
    """
    if len(scores) != len(target_ids):
        raise ValueError(f"{len(scores)} score maps for {len(target_ids)} targets")
    refs = list(reference_ids) if reference_ids is not None else [None] * len(scores)
    if len(refs) != len(scores):
        raise ValueError(f"{len(refs)} reference ids for {len(scores)} queries")
    return [subset_rank(s, t, r) for s, t, r in zip(scores, target_ids, refs)]


def top_k_ids(
    ids: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    k: int,
    exclude: Collection[str] = (),
) -> list[str]:
    """The ``k`` highest-scoring ids, best first, skipping ``exclude``; ties keep the order of ``ids``.

    >>> top_k_ids(["ref", "a", "b", "c"], [0.9, 0.5, 0.7, 0.5], 3, exclude={"ref"})
    ['b', 'a', 'c']
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(ids),):
        raise ValueError(f"{len(ids)} ids but scores of shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    order = np.argsort(-s, kind="stable")
    out: list[str] = []
    for i in order:
        if len(out) == k:
            break
        if ids[i] not in exclude:
            out.append(ids[i])
    return out


def cirr_submission(
    pairids: Sequence[PairId],
    ranked_ids: Sequence[Sequence[str]],
    metric: CirrMetric,
    *,
    reference_ids: Sequence[str | None] | None = None,
    version: str = "rc2",
) -> dict[str, Any]:
    """One CIRR server submission: ``{"version", "metric", "<pairid>": top-K ids}``.

    ``ranked_ids[i]`` is query ``i``'s ranking, best first: over the whole gallery for ``"recall"``
    (the first 50 are kept), over ``img_set.members`` minus the reference for ``"recall_subset"``
    (the first 3 are kept). With ``reference_ids``, each query's reference is removed from its list
    before truncation. A list with repeated ids, or shorter than K, raises ``ValueError``.

    >>> cirr_submission([12063], [["a", "b", "c", "d"]], "recall_subset")
    {'version': 'rc2', 'metric': 'recall_subset', '12063': ['a', 'b', 'c']}
    """
    if metric not in CIRR_SUBMISSION_TOP_K:
        raise ValueError(f"metric must be one of {tuple(CIRR_SUBMISSION_TOP_K)}, got {metric!r}")
    k = CIRR_SUBMISSION_TOP_K[metric]
    if len(pairids) != len(ranked_ids):
        raise ValueError(f"{len(pairids)} pairids but {len(ranked_ids)} rankings")
    refs = list(reference_ids) if reference_ids is not None else [None] * len(pairids)
    if len(refs) != len(pairids):
        raise ValueError(f"{len(refs)} reference ids for {len(pairids)} queries")
    out: dict[str, Any] = {"version": version, "metric": metric}
    for pairid, ranking, ref in zip(pairids, ranked_ids, refs):
        key = str(pairid)
        if key in out:
            raise ValueError(f"duplicate or reserved pairid {key!r}")
        ids = [i for i in ranking if i != ref]
        if len(set(ids)) != len(ids):
            raise ValueError(f"pairid {key}: the ranking repeats ids")
        if len(ids) < k:
            raise ValueError(f"pairid {key}: {metric} needs {k} ranked ids, got {len(ids)}")
        out[key] = [str(i) for i in ids[:k]]
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then move it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_cirr_submissions(
    path_prefix: str | Path,
    pairids: Sequence[PairId],
    recall_ranked_ids: Sequence[Sequence[str]],
    subset_ranked_ids: Sequence[Sequence[str]],
    *,
    reference_ids: Sequence[str | None] | None = None,
    version: str = "rc2",
) -> tuple[Path, Path]:
    """Write ``<path_prefix>_recall.json`` and ``<path_prefix>_recall_subset.json`` atomically.

    The two files are the CIRR server's two uploads (see :func:`cirr_submission`); e.g. the prefix
    ``out/test1_pred_ranks`` gives the names of the official demo files. Returns both paths.
    """
    recall = cirr_submission(pairids, recall_ranked_ids, "recall", reference_ids=reference_ids, version=version)
    subset = cirr_submission(pairids, subset_ranked_ids, "recall_subset", reference_ids=reference_ids,
                             version=version)
    prefix = str(path_prefix)
    recall_path, subset_path = Path(prefix + "_recall.json"), Path(prefix + "_recall_subset.json")
    _write_json_atomic(recall_path, recall)
    _write_json_atomic(subset_path, subset)
    return recall_path, subset_path
