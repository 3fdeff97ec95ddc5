"""Bootstrap intervals of a mean (or a ratio of sums) over queries, and over seeds then queries.

A benchmark's queries are not its only source of noise: when they come in groups drawn independently (task seeds,
sampling seeds), the groups vary too. :func:`resample_weights` draws queries with replacement (``groups=None``), or
hierarchically: groups with replacement, then queries with replacement within each drawn group, which is what an
interval "over seeds as well as queries" means. A resample is a vector of weights (how often each query was drawn),
so every statistic of a benchmark is computed on the same resamples (paired comparisons included) by one matrix
product.

Statistics are ratios of sums, ``sum(numerator) / sum(denominator)``: a mean when the denominators are 1, a micro
average (e.g. pairwise agreement over all candidate pairs) when they count pairs.

Training runs give a third shape: a seed x query matrix per arm, where every seed (a training run) is scored on the
same queries. Seeds and queries are then crossed, not nested: :func:`seed_query_statistics` draws each arm's seeds
with replacement and one draw of the queries shared by every arm (so arms stay paired over queries), and
:func:`seed_query_interval` takes its percentile interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ratio(numerator: np.ndarray, denominator: np.ndarray | None = None) -> float:
    """``sum(numerator) / sum(denominator)`` (a mean without denominators); NaN when the denominator sums to 0.

    >>> ratio(np.array([1.0, 0.0, 1.0])), ratio(np.array([1.0, 3.0]), np.array([2.0, 4.0]))
    (0.6666666666666666, 0.6666666666666666)
    """
    numerator = np.asarray(numerator, dtype=np.float64)
    den = float(len(numerator)) if denominator is None else float(np.sum(denominator))
    return float(np.sum(numerator) / den) if den > 0 else float("nan")


def group_rows(groups: Sequence[object] | None, size: int) -> list[np.ndarray]:
    """The rows of each group, groups in sorted order (one group of every row when ``groups`` is None).

    >>> [r.tolist() for r in group_rows(["b", "a", "b"], 3)]
    [[1], [0, 2]]
    """
    if groups is None:
        return [np.arange(size)]
    if len(groups) != size:
        raise ValueError(f"got {len(groups)} group labels for {size} values")
    labels: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        labels.setdefault(g, []).append(i)
    return [np.array(rows) for _, rows in sorted(labels.items(), key=lambda kv: str(kv[0]))]


def resample_weights(size: int, groups: Sequence[object] | None = None, resamples: int = 2000,
                     seed: int = 0) -> np.ndarray:
    """A (resamples, size) matrix: how often each row is drawn in each bootstrap resample.

    ``groups=None``: ``size`` rows drawn with replacement. With group labels (at least two groups): as many groups
    drawn with replacement, then, for each drawn group, its rows drawn with replacement.

    >>> w = resample_weights(5, resamples=3)
    >>> w.shape, w.sum(1).tolist()
    ((3, 5), [5.0, 5.0, 5.0])
    """
    if size < 1:
        raise ValueError("nothing to resample")
    parts = group_rows(groups, size)
    if groups is not None and len(parts) < 2:
        raise ValueError("a bootstrap over groups needs at least two groups")
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, size))
    for b in range(resamples):
        chosen = parts if groups is None else [parts[i] for i in rng.integers(0, len(parts), len(parts))]
        for rows in chosen:
            np.add.at(weights[b], rows[rng.integers(0, len(rows), len(rows))], 1.0)
    return weights


def interval(weights: np.ndarray, numerator: np.ndarray, denominator: np.ndarray | None = None,
             confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of ``ratio(numerator, denominator)`` over the resamples of ``weights``.

    >>> values = np.r_[np.ones(60), np.zeros(40)]
    >>> lo, hi = interval(resample_weights(100), values)
    >>> 0.49 < lo < 0.6 < hi < 0.71
    True
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.ones_like(num) if denominator is None else np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.shape != (weights.shape[1],):
        raise ValueError(f"need arrays of {weights.shape[1]} values, got {num.shape} and {den.shape}")
    total = weights @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = (weights @ num) / total
    return percentile_interval(stats, confidence)


def percentile_interval(stats: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of bootstrap statistics (non-finite ones left out).

    >>> percentile_interval(np.arange(101.0), 0.5)
    (25.0, 75.0)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    stats = np.asarray(stats, dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


LEVELS: tuple[str, ...] = ("seeds", "queries", "both")
"""What :func:`seed_query_statistics` resamples: the seeds of each arm, the queries, or both (seeds, then queries)."""


def seed_query_statistics(a: np.ndarray, b: np.ndarray | None = None, *, level: str = "both",
                          resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap resamples of ``mean(a) - mean(b)`` (``mean(a)`` when ``b`` is None) for seed x query matrices.

    ``a`` is (seeds, queries): one row per training seed, every row scored on the same queries; ``b`` is another arm's
    matrix over the same queries (any number of seeds), or one row (a single deterministic evaluation, such as the
    untrained policy or the original queries). ``level="seeds"`` draws each matrix's rows with replacement,
    independently per matrix, the queries fixed; ``"queries"`` draws the columns with replacement, the seeds fixed;
    ``"both"`` draws both in every resample. The query draw is shared by ``a`` and ``b``: the comparison is paired over
    queries, and not over seeds (different arms' seeds are different training runs).

    >>> a = np.array([[1.0, 0.0], [1.0, 1.0]])
    >>> stats = seed_query_statistics(a, np.array([0.0, 0.0]), level="seeds", resamples=400)
    >>> sorted(set(stats.tolist()))
    [0.5, 0.75, 1.0]
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    a = _seed_rows(a, "a")
    arms = [a] if b is None else [a, _seed_rows(b, "b")]
    queries = a.shape[1]
    if any(m.shape[1] != queries for m in arms):
        raise ValueError(f"a and b must score the same queries: {queries} and {arms[-1].shape[1]} columns")
    if level == "seeds":
        columns = np.ones((resamples, queries))
    else:
        columns = resample_weights(queries, None, resamples, seed)
    out = np.zeros(resamples)
    for sign, matrix, offset in zip((1.0, -1.0), arms, (1, 2)):
        if level == "queries":
            rows = np.ones((resamples, matrix.shape[0]))
        else:
            rows = resample_weights(matrix.shape[0], None, resamples, seed + offset)
        out += sign * ((rows @ matrix) * columns).sum(axis=1) / (rows.sum(axis=1) * columns.sum(axis=1))
    return out


def seed_query_interval(a: np.ndarray, b: np.ndarray | None = None, *, level: str = "both",
                        confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The percentile interval of :func:`seed_query_statistics` (``mean(a) - mean(b)``, or ``mean(a)``).

    With two seeds per arm, the seed-level 95% interval of a difference is [min of a's seed means - max of b's,
    max of a's - min of b's]: each of those extremes has probability 1/16 among the resamples, more than 2.5%.

    >>> a, b = np.array([[0.5, 0.7], [0.2, 0.2]]), np.array([[0.1, 0.1], [0.3, 0.5]])
    >>> [round(x, 6) for x in seed_query_interval(a, b, level="seeds")]
    [-0.2, 0.5]
    """
    return percentile_interval(seed_query_statistics(a, b, level=level, resamples=resamples, seed=seed), confidence)


def _seed_rows(matrix: np.ndarray, name: str) -> np.ndarray:
    """A (seeds, queries) float matrix; one row for a 1-d array."""
    out = np.asarray(matrix, dtype=np.float64)
    if out.ndim == 1:
        out = out[None, :]
    if out.ndim != 2 or out.shape[0] < 1 or out.shape[1] < 1:
        raise ValueError(f"{name} must be a (seeds, queries) matrix with at least one of each, got shape {out.shape}")
    return out


def bootstrap_interval(numerator: np.ndarray, denominator: np.ndarray | None = None, *,
                       groups: Sequence[object] | None = None, confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """:func:`interval` on fresh :func:`resample_weights` (one statistic; a benchmark shares the weights).

    >>> bootstrap_interval(np.r_[np.ones(50), np.zeros(50)], groups=["a"] * 50 + ["b"] * 50)[0] < 0.1
    True
    """
    num = np.asarray(numerator)
    return interval(resample_weights(num.size, groups, resamples, seed), num, denominator, confidence)
