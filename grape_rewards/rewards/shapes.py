"""Rank-shaped rewards: map a rank ``r`` among ``N`` candidates to a reward in [0, 1].

=============  ==============================  ======================
shape          formula                         r = 1 / r = N
=============  ==============================  ======================
``linear``     1 - (r - 1) / (N - 1)           1 / 0
``reciprocal`` 1 / r                           1 / 1/N
``log``        1 / log2(1 + r)                 1 / 1/log2(1+N)
``loglinear``  1 - ln(r) / ln(N)               1 / 0
``recall@k``   1 if r <= k else 0              1 / 0 (for N > k)
=============  ==============================  ======================

``loglinear`` pays the same for every halving of the rank, so it is not flat deep in the ranking (``log`` spans
0.150 to 0.089 between ranks 100 and 2,400; ``loglinear`` 0.41 to 0.00 over a corpus of 2,400). Every shape but
``recall@k`` also takes a real rank: the graded ranks of :mod:`grape_rewards.rewards.graded_rank`.

The ``relative`` mode rewards the change against the original query: shape(r') - shape(r).
"""

from __future__ import annotations

import math
from typing import Literal

RankShape = Literal["linear", "reciprocal", "log", "loglinear", "recall@k"]
RANK_SHAPES: tuple[str, ...] = ("linear", "reciprocal", "log", "loglinear", "recall@k")


def check_rank(rank: float, n: int) -> None:
    """Refuse a rank outside [1, n] (ranks may be real: graded ranks).

    >>> check_rank(0, 10)
    Traceback (most recent call last):
    ...
    ValueError: rank must satisfy 1 <= rank <= n, got rank=0, n=10
    """
    if n < 1 or not 1 <= rank <= n:
        raise ValueError(f"rank must satisfy 1 <= rank <= n, got rank={rank}, n={n}")


def linear_rank_reward(rank: float, n: int) -> float:
    """1 - (r - 1) / (N - 1); 1.0 when N = 1.

    >>> linear_rank_reward(1, 101), linear_rank_reward(51, 101), linear_rank_reward(101, 101)
    (1.0, 0.5, 0.0)
    """
    check_rank(rank, n)
    return 1.0 if n == 1 else 1.0 - (rank - 1) / (n - 1)


def reciprocal_rank_reward(rank: float, n: int) -> float:
    """1 / r.

    >>> reciprocal_rank_reward(4, 10)
    0.25
    """
    check_rank(rank, n)
    return 1.0 / rank


def log_rank_reward(rank: float, n: int) -> float:
    """1 / log2(1 + r) (the DCG discount).

    >>> log_rank_reward(1, 10), log_rank_reward(3, 10)
    (1.0, 0.5)
    """
    check_rank(rank, n)
    return 1.0 / math.log2(1 + rank)


def loglinear_rank_reward(rank: float, n: int) -> float:
    """1 - ln(r) / ln(N): linear in the logarithm of the rank; 1.0 when N = 1.

    >>> loglinear_rank_reward(1, 100), loglinear_rank_reward(10, 100), loglinear_rank_reward(100, 100)
    (1.0, 0.5, 0.0)
    """
    check_rank(rank, n)
    return 1.0 if n == 1 else 1.0 - math.log(rank) / math.log(n)


def recall_at_k_reward(rank: int, n: int, k: int) -> float:
    """1 if r <= k else 0.

    >>> recall_at_k_reward(10, 100, k=10), recall_at_k_reward(11, 100, k=10)
    (1.0, 0.0)
    """
    check_rank(rank, n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 1.0 if rank <= k else 0.0


def rank_reward(rank: float, n: int, shape: str = "log", k: int = 10) -> float:
    """Dispatch to the named rank shape (``recall@k`` takes whole ranks only).

    >>> rank_reward(2, 3, "linear"), rank_reward(2, 3, "recall@k", k=1)
    (0.5, 0.0)
    """
    if shape == "linear":
        return linear_rank_reward(rank, n)
    if shape == "reciprocal":
        return reciprocal_rank_reward(rank, n)
    if shape == "log":
        return log_rank_reward(rank, n)
    if shape == "loglinear":
        return loglinear_rank_reward(rank, n)
    if shape == "recall@k":
        if rank != int(rank):
            raise ValueError(f"the recall@k shape takes whole ranks, got {rank}")
        return recall_at_k_reward(int(rank), n, k)
    raise ValueError(f"unknown rank shape {shape!r}; choose one of {', '.join(RANK_SHAPES)}")


def relative_rank_reward(rank: float, original_rank: float, n: int, shape: str = "log", k: int = 10) -> float:
    """shape(r_rewrite) - shape(r_original), in [-1, 1]: positive when the rewrite ranks the target higher.

    >>> relative_rank_reward(1, 3, 10, "log")
    0.5
    """
    return rank_reward(rank, n, shape, k) - rank_reward(original_rank, n, shape, k)
