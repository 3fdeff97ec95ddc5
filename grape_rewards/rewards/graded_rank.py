"""Graded ranks: the target's standing among the corpus as a real number, so that rank 1 is not a ceiling.

The plain rank ``r`` (1 + the items scoring above the best target) cannot order rewrites that all reach rank 1, and
it moves in whole steps. A graded rank ``rho`` keeps GRAPE's idea, the target's standing among the whole corpus, and
adds what the plain rank throws away:

``margin`` (the interpolated rank; ``r`` with a margin tie-break that never overturns a rank step)::

    rank 1:      rho = 1 + T / (T + b)             in (1, 2]
    rank r > 1:  rho = r + a / (a + b)             in [r, r + 1]
    rank N:      rho = N                           (nothing below the target)

  where ``a`` is the target's gap to the lowest item above it, ``b`` its gap to the highest item not above it (at rank
  1, ``b`` is the margin over the best non-target) and ``T`` a similarity scale (the ``temperature``). A rewrite that
  separates the target further earns a lower ``rho``; ``rho`` is continuous in the scores (at a rank step as well:
  a tie with the item above or below lands on the shared boundary), and a worse plain rank never gets a lower ``rho``.

``soft`` (a soft rank, a sigmoid in place of the step of the count)::

    rho = 1 + sum over the ranked items c of sigmoid((s(q, c) - s(q, t)) / T)    in [1, N]

  smooth everywhere, but not ordered by the plain rank: many items just below the target can weigh more than one
  item above it.

A rank shape then maps ``rho`` to the reward (:func:`grape_rewards.rewards.shapes.rank_reward`, which takes real
ranks for every shape but ``recall@k``). Everything here is plain arithmetic on numbers the corpus scan returns.
"""

from __future__ import annotations

import math
from typing import Literal

from .shapes import check_rank

RankMode = Literal["hard", "margin", "soft"]
RANK_MODES: tuple[str, ...] = ("hard", "margin", "soft")


def interpolated_rank(rank: int, n: int, gap_above: float, gap_below: float, temperature: float) -> float:
    """The ``margin`` graded rank: ``rank`` plus how far the target sits from the item just above it.

    Args:
        rank: the plain rank (1 + items strictly above the best target).
        n: the number of ranked candidates (the target included).
        gap_above: the lowest score above the target minus the target's score (> 0; ``inf`` at rank 1).
        gap_below: the target's score minus the highest non-target score not above it (>= 0; ``inf`` when no item is
            below, i.e. at rank ``n``). At rank 1 this is the margin over the best non-target.
        temperature: the similarity scale of the margin at rank 1 (> 0).

    >>> interpolated_rank(1, 100, math.inf, 0.0, 0.05)      # a tie with the best non-target: the rank-2 boundary
    2.0
    >>> interpolated_rank(1, 100, math.inf, 0.05, 0.05)     # a margin of one temperature
    1.5
    >>> interpolated_rank(3, 100, 0.01, 0.03, 0.05)         # a quarter of the way down from the item above
    3.25
    >>> interpolated_rank(100, 100, 0.2, math.inf, 0.05)
    100.0
    """
    check_rank(rank, n)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n == 1:
        return 1.0
    b = max(float(gap_below), 0.0)
    if rank == 1:
        return 1.0 + temperature / (temperature + b) if math.isfinite(b) else 1.0
    if not math.isfinite(b):  # rank n: nothing below the target
        return float(rank)
    a = max(float(gap_above), 0.0)
    if a + b == 0.0:  # cannot happen with exact ties (an item above is strictly above); kept total
        return rank + 0.5
    return rank + a / (a + b)


def soft_rank(soft_count: float, n: int) -> float:
    """The ``soft`` graded rank: 1 + the summed sigmoids the scan returns, kept in [1, n].

    >>> soft_rank(0.25, 10), soft_rank(30.0, 10)
    (1.25, 10.0)
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not soft_count >= 0:
        raise ValueError(f"the summed sigmoids must be >= 0, got {soft_count}")
    return min(1.0 + float(soft_count), float(n))



def graded_rank(mode: str, rank: int, n: int, *, gap_above: float = math.inf, gap_below: float = math.inf,
                soft_count: float | None = None, temperature: float = 1.0) -> float:
    """The rank a shape is applied to under ``mode``: the plain rank (``hard``), or a graded one.

    >>> graded_rank("hard", 3, 10), graded_rank("margin", 1, 10, gap_below=0.05, temperature=0.05)
    (3.0, 1.5)
    >>> graded_rank("soft", 1, 10, soft_count=0.5)
    1.5
    """
    if mode == "hard":
        check_rank(rank, n)
        return float(rank)
    if mode == "margin":
        return interpolated_rank(rank, n, gap_above, gap_below, temperature)
    if mode == "soft":
        if soft_count is None:
            raise ValueError("the soft rank needs the scan's summed sigmoids (soft_count)")
        return soft_rank(soft_count, n)
    raise ValueError(f"unknown rank mode {mode!r}; choose one of {', '.join(RANK_MODES)}")
