"""grape_rewards.eval.bootstrap on seed x query matrices: the seed-level interval of a difference equals the exact
bootstrap distribution's quantiles (every resample enumerated), the query level equals the plain bootstrap over
queries of the per-query difference, and each level leaves the other factor alone."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from grape_rewards.eval import bootstrap

# Per-query offsets with mean 0: the queries vary, the seed means are exactly the values below.
OFFSETS = np.array([-0.1, 0.05, 0.0, 0.1, -0.05])
OTHER_OFFSETS = np.array([0.2, -0.2, 0.1, -0.1, 0.0])  # the per-query difference varies widely


def _matrix(seed_means: list[float], offsets: np.ndarray = OFFSETS) -> np.ndarray:
    return np.array(seed_means)[:, None] + offsets[None, :]


def _exact_seed_distribution(a_means: list[float], b_means: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Atoms and cumulative probabilities of mean(a's seeds drawn) - mean(b's seeds drawn), every draw enumerated."""
    def draws(means: list[float]) -> Counter:
        out: Counter = Counter()
        for idx in itertools.product(range(len(means)), repeat=len(means)):
            out[round(float(np.mean([means[i] for i in idx])), 9)] += 1 / len(means) ** len(means)
        return out

    diff: Counter = Counter()
    for x, p in draws(a_means).items():
        for y, q in draws(b_means).items():
            diff[round(x - y, 9)] += p * q
    atoms = np.array(sorted(diff))
    return atoms, np.cumsum([diff[x] for x in atoms])


def test_seed_level_interval_is_the_exact_bootstrap_quantile() -> None:
    """Three seeds against four, distinct seed means: the 2.5% and 97.5% points of every possible seed resample
    (3^3 x 4^4 of them, equally likely) are the interval's ends. The quantiles sit at least 0.5 percentage points
    inside their atoms, so 20,000 resamples land on the same atoms (six standard errors of a 2.5% share)."""
    a_means, b_means = [0.05, 0.2, 0.35], [0.2, 0.4, 0.45, 0.65]
    atoms, cdf = _exact_seed_distribution(a_means, b_means)
    expected = []
    for q in (0.025, 0.975):
        i = int(np.searchsorted(cdf, q))
        below = cdf[i - 1] if i else 0.0
        assert min(q - below, cdf[i] - q) > 0.005  # the case is far from an atom's edge
        expected.append(atoms[i])
    got = bootstrap.seed_query_interval(_matrix(a_means), _matrix(b_means, OTHER_OFFSETS), level="seeds",
                                        resamples=20000)
    assert got == pytest.approx(expected, abs=1e-9)


def test_two_seeds_per_arm_give_the_extremes() -> None:
    a, b = _matrix([0.3, 0.5]), _matrix([0.1, 0.45], OTHER_OFFSETS)
    assert bootstrap.seed_query_interval(a, b, level="seeds") == pytest.approx([0.3 - 0.45, 0.5 - 0.1])


def test_query_level_is_the_plain_bootstrap_of_the_per_query_difference() -> None:
    rng = np.random.default_rng(3)
    a, b = (rng.random((5, 40)) < 0.6).astype(float), (rng.random((4, 40)) < 0.4).astype(float)
    per_query = a.mean(0) - b.mean(0)
    expected = bootstrap.interval(bootstrap.resample_weights(40, None, 500, seed=7), per_query)
    assert bootstrap.seed_query_interval(a, b, level="queries", resamples=500, seed=7) == pytest.approx(expected)
    # One row for b: a single evaluation (the untrained policy, the original queries) is a fixed reference.
    fixed = b[0]
    expected = bootstrap.interval(bootstrap.resample_weights(40, None, 500, seed=7), a.mean(0) - fixed)
    assert bootstrap.seed_query_interval(a, fixed, level="queries", resamples=500, seed=7) == pytest.approx(expected)


def test_each_level_resamples_only_its_factor() -> None:
    rng = np.random.default_rng(0)
    row_a, row_b = rng.random(30), rng.random(30)
    same_seeds_a, same_seeds_b = np.tile(row_a, (4, 1)), np.tile(row_b, (5, 1))  # seeds identical: only queries vary
    both = bootstrap.seed_query_statistics(same_seeds_a, same_seeds_b, level="both", resamples=300, seed=2)
    queries = bootstrap.seed_query_statistics(same_seeds_a, same_seeds_b, level="queries", resamples=300, seed=2)
    np.testing.assert_allclose(both, queries, rtol=0, atol=1e-12)
    flat_a, flat_b = np.repeat(rng.random((4, 1)), 30, 1), np.repeat(rng.random((5, 1)), 30, 1)  # queries identical
    both = bootstrap.seed_query_statistics(flat_a, flat_b, level="both", resamples=300, seed=2)
    seeds = bootstrap.seed_query_statistics(flat_a, flat_b, level="seeds", resamples=300, seed=2)
    np.testing.assert_allclose(both, seeds, rtol=0, atol=1e-12)
    assert np.ptp(seeds) > 0 and np.ptp(queries) > 0


def test_one_arm_mean_and_bad_shapes() -> None:
    a = _matrix([0.2, 0.6])
    assert bootstrap.seed_query_interval(a, level="seeds") == pytest.approx([0.2, 0.6])
    with pytest.raises(ValueError, match="same queries"):
        bootstrap.seed_query_statistics(a, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="level must be one of seeds, queries, both"):
        bootstrap.seed_query_statistics(a, level="groups")
    with pytest.raises(ValueError, match=r"\(seeds, queries\) matrix"):
        bootstrap.seed_query_statistics(np.zeros((2, 2, 2)))
