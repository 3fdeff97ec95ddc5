"""Corpus-relative rank of a query's target(s), computed exactly by chunked matrix products.

The rank of a query ``q`` with targets ``T`` over a corpus ``C``, excluding ``E``::

    r = 1 + |{c in C \\ (T ∪ E) : s(q, c) > max_{t in T} s(q, t)}|
    N = |C \\ (T ∪ E)| + 1

``s`` is the dot product of L2-normalised embeddings (cosine similarity). Ties count in the
target's favour: an item must score strictly higher than the best target to push it down.

Ties are exact. A matrix product (the scan) and an elementwise product-and-sum (a target's score) round
differently, so a bit-identical duplicate of the target could land one last bit above it. Here every
comparison that the scan's rounding could decide either way is decided by one exact arithmetic instead:
the best target score is computed in float64 (:func:`pair_scores`); the scan counts an item above it only
when its float32 score exceeds it by more than the scan's rounding error bound (:func:`scan_error_bound`),
and every item inside that band is scored again in float64 and compared exactly. Ranks therefore equal a
float64 recomputation from the stored corpus and the query as the scan sees it (on a GPU with a float16
corpus the queries are rounded to float16 first, products accumulate in float32), on every device, however
the corpus is chunked or sharded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..devices import to_device
from .rank_kernels import row_max_count, use_fused

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Upper bound on query x corpus scores held at once on the CPU (64 MiB of float32)."""
CUDA_CHUNK_ELEMENTS = 1 << 26
"""The same bound on a GPU (256 MiB): fewer, larger chunks keep the kernels busy between launches."""


def default_chunk_elements(device: torch.device | str) -> int:
    """The chunk bound for scoring on ``device``.

    >>> default_chunk_elements("cpu") == DEFAULT_CHUNK_ELEMENTS
    True
    """
    return CUDA_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else DEFAULT_CHUNK_ELEMENTS


@dataclass(frozen=True)
class RankStats:
    """Per-query ranking statistics; every field is a 1-D tensor of length Q (on the CPU)."""

    rank: torch.Tensor
    """1 + number of non-target, non-excluded items scoring above the best target (int64)."""
    n: torch.Tensor
    """Number of candidates the rank is taken over: non-target, non-excluded items + 1 (int64)."""
    target_sim: torch.Tensor
    """Similarity to the best target (float32)."""
    mean_sim: torch.Tensor
    """Mean similarity to the non-target, non-excluded items (0 when there are none)."""
    best_nontarget_sim: torch.Tensor
    """Highest similarity among non-target, non-excluded items (-1 when there are none)."""
    gap_above: torch.Tensor | None = None
    """(:class:`ScanExtras` ``neighbours``) The lowest score above the best target minus the target's score, float64
    (> 0; inf at rank 1)."""
    gap_below: torch.Tensor | None = None
    """(``neighbours``) The target's score minus the highest non-target score not above it, float64 (>= 0; at rank 1
    the margin over the best non-target; inf when no item is below)."""
    soft_count: torch.Tensor | None = None
    """(``soft_temperature``) The sum over the ranked items of sigmoid((score - target score) / T), float64."""

    @property
    def margin(self) -> torch.Tensor:
        """Similarity to the best target minus similarity to the best non-target."""
        return self.target_sim - self.best_nontarget_sim


def _pairs(rows: Sequence[Sequence[int]], num_queries: int, num_items: int, what: str) -> torch.Tensor:
    """Flatten per-query row lists into a (2, P) tensor of (query, row) pairs, validated."""
    if len(rows) != num_queries:
        raise ValueError(f"{what}: got {len(rows)} lists for {num_queries} queries")
    q_idx: list[int] = []
    r_idx: list[int] = []
    for i, row_list in enumerate(rows):
        for r in row_list:
            r = int(r)
            if not 0 <= r < num_items:
                raise ValueError(f"{what}: row {r} of query {i} is outside the corpus (size {num_items})")
            q_idx.append(i)
            r_idx.append(r)
    return torch.tensor([q_idx, r_idx], dtype=torch.long).reshape(2, -1)


def score_block(queries: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """float32 scores of (Q, D) queries against a (B, D) block of the corpus.

    On CUDA with a half-precision corpus the product runs on tensor cores in the corpus' dtype with float32
    accumulation and output (``torch.mm(..., out_dtype=float32)``), so the corpus is never converted; the
    queries are rounded to that dtype. Elsewhere the block is converted to float32 (bounded by the block).
    """
    if block.is_cuda and block.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(queries.to(block.dtype), block.T, out_dtype=torch.float32)
        except TypeError:  # torch < 2.8 has no out_dtype: convert the block (bounded by the chunk)
            pass
    return queries.to(torch.float32) @ block.to(torch.float32).T


def scan_queries(queries: torch.Tensor, corpus: torch.Tensor) -> torch.Tensor:
    """The float32 queries as :func:`score_block` sees them: rounded to the corpus' dtype on CUDA half precision."""
    if corpus.is_cuda and corpus.dtype in (torch.float16, torch.bfloat16):
        queries = queries.to(corpus.dtype)
    return queries.to(torch.float32)


def pair_scores(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Exact (float64) score of each query row against the matching corpus row: the arithmetic ties are decided by.

    ``queries`` are taken as :func:`scan_queries` gives them. Products of float32 numbers are exact in float64
    and the sum's rounding is far below float32 resolution, so two bit-identical rows get bit-identical scores.

    >>> pair_scores(torch.tensor([[0.6, 0.8]]), torch.tensor([[0.6, 0.8]])).dtype
    torch.float64
    """
    return (queries.to(torch.float64) * rows.to(torch.float64)).sum(-1)


def _unit_roundoff(corpus: torch.Tensor) -> float:
    """Unit roundoff of :func:`score_block`'s products and sums on ``corpus``.

    float32 (2^-24) on the CPU; on CUDA half precision 2^-23 (tensor cores may truncate instead of rounding
    when they accumulate); on CUDA float32 what ``torch.backends.cuda.matmul`` allows (TF32: 2^-10, bfloat16
    passes: 2^-7).
    """
    if not corpus.is_cuda:
        return 2.0 ** -24
    if corpus.dtype in (torch.float16, torch.bfloat16):
        return 2.0 ** -23
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0 ** -7
    if precision == "high" or torch.backends.cuda.matmul.allow_tf32:
        return 2.0 ** -10
    return 2.0 ** -24


def max_row_norm(corpus: torch.Tensor) -> float:
    """The largest L2 norm of a corpus row (0 for an empty corpus); bounds every score's rounding error.

    >>> max_row_norm(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    5.0
    """
    if corpus.shape[0] == 0:
        return 0.0
    return float(torch.linalg.vector_norm(corpus, dim=1, dtype=torch.float32).max())


def scan_error_bound(queries: torch.Tensor, corpus: torch.Tensor, corpus_norm: float | None = None) -> torch.Tensor:
    """Per query, a bound on ``|score_block - pair_scores|`` over every row of ``corpus`` (float64, on the host).

    A dot product of length D summed in any order with unit roundoff u is off by at most
    ``gamma_D * sum|q_i c_i| <= gamma_D * |q| * |c|`` with ``gamma_D = D u / (1 - D u)`` (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1); doubled for the float32 rounding of the result and some slack.

    >>> float(scan_error_bound(torch.ones(1, 4) / 2, torch.eye(4))[0]) < 1e-6
    True
    """
    dim = corpus.shape[1]
    du = (dim + 2) * _unit_roundoff(corpus)
    if du >= 0.5:  # no useful bound: every comparison is made exactly
        return torch.full((queries.shape[0],), float("inf"), dtype=torch.float64)
    norm = max_row_norm(corpus) if corpus_norm is None else corpus_norm
    q = torch.linalg.vector_norm(queries.detach().to("cpu", torch.float64), dim=1)
    return 2 * du / (1 - du) * q * norm + 2 * torch.finfo(torch.float32).tiny


def tie_band(thresholds: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(low, high)`` around float64 ``thresholds``, rounded outwards, ``bound`` away on each side.

    A float32 score above ``high`` is surely above its threshold, one at or below ``low`` surely not; the
    scores in between are decided exactly. A query without a threshold (-inf) has an empty band.

    >>> low, high = tie_band(torch.tensor([0.5, float("-inf")], dtype=torch.float64),
    ...                      torch.tensor([1e-3, 1e-3], dtype=torch.float64))
    >>> bool(low[0] < 0.499 and high[0] > 0.501), low[1].item(), high[1].item()
    (True, -inf, -inf)
    """
    t = thresholds.to(torch.float64)
    bound = bound.to(device=t.device, dtype=torch.float64)
    finite = torch.isfinite(t)
    lo64 = torch.where(finite, t - bound, t)
    hi64 = torch.where(finite, t + bound, t)
    low, high = lo64.to(torch.float32), hi64.to(torch.float32)
    low = torch.where(low.to(torch.float64) > lo64, torch.nextafter(low, torch.full_like(low, float("-inf"))), low)
    high = torch.where(high.to(torch.float64) < hi64, torch.nextafter(high, torch.full_like(high, float("inf"))), high)
    return low, high


def chunk_rows(num_queries: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Corpus rows per chunk so that a chunk of scores holds at most ``chunk_elements`` floats.

    >>> chunk_rows(1024, 1 << 24)
    16384
    >>> chunk_rows(10**9, 1000)
    1
    """
    return max(1, chunk_elements // max(1, num_queries))


@dataclass(frozen=True)
class ScanExtras:
    """What a scan gathers besides the rank, the mean and the best non-target score, for graded ranks
    (:mod:`grape_rewards.rewards.graded_rank`). Each costs work on every chunk, so each is off unless asked for.

    >>> ScanExtras().wanted, ScanExtras(neighbours=True).wanted
    (False, True)
    """

    neighbours: bool = False
    """The scores of the target's neighbours: the lowest item above it and the highest item not above it."""
    soft_temperature: float | None = None
    """When set: the sum over the ranked items of sigmoid((score - target score) / soft_temperature)."""

    def __post_init__(self) -> None:
        if self.soft_temperature is not None and not self.soft_temperature > 0:
            raise ValueError(f"soft_temperature must be > 0, got {self.soft_temperature}")

    @property
    def wanted(self) -> bool:
        return self.neighbours or self.soft_temperature is not None


NO_EXTRAS = ScanExtras()


@dataclass(frozen=True)
class ScanCounts:
    """What a scan of (part of) the corpus contributes to each query's statistics; additive over a partition.

    Rank is additive over any partition of the corpus: the global rank is 1 + the sum over parts of the
    items scoring above the best target, so a corpus sharded across devices or processes is ranked exactly
    by :func:`scan_counts` on each shard and :func:`merge_counts`.
    """

    count_above: torch.Tensor
    """Non-target, non-excluded items scoring strictly above the threshold (int64)."""
    total: torch.Tensor
    """Sum of their scores (float64), for the mean."""
    n_others: torch.Tensor
    """How many non-target, non-excluded items the part holds (int64)."""
    best: torch.Tensor
    """Highest score among them (-inf when none)."""
    next_above: torch.Tensor | None = None
    """(:class:`ScanExtras` ``neighbours``) The lowest score above the threshold, float64 (inf when none)."""
    next_below: torch.Tensor | None = None
    """(``neighbours``) The highest score not above the threshold, float64 (-inf when none)."""
    soft: torch.Tensor | None = None
    """(``soft_temperature``) The summed sigmoids of (score - threshold) / T, float64."""

    @classmethod
    def empty(cls, extras: ScanExtras = NO_EXTRAS) -> ScanCounts:
        """The counts of a scan of no queries (with the fields ``extras`` asks for)."""
        none = torch.zeros(0, dtype=torch.float64)
        neighbours = none if extras.neighbours else None
        return cls(torch.zeros(0, dtype=torch.long), none, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                   next_above=neighbours, next_below=neighbours,
                   soft=none if extras.soft_temperature is not None else None)


def _merged(parts: Sequence[ScanCounts], name: str, how: str) -> torch.Tensor | None:
    values = [getattr(p, name) for p in parts]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"some parts of the scan carry {name!r} and others do not: scan every part with the same "
                         "extras")
    stacked = torch.stack([v.cpu() for v in values])
    return {"sum": stacked.sum(0), "min": stacked.amin(0), "max": stacked.amax(0)}[how]


def merge_counts(parts: Sequence[ScanCounts]) -> ScanCounts:
    """Combine the scans of the parts of a partition (sums, the max of the best, the nearest neighbours)."""
    if not parts:
        raise ValueError("nothing to merge")
    return ScanCounts(
        count_above=torch.stack([p.count_above.cpu() for p in parts]).sum(0),
        total=torch.stack([p.total.cpu() for p in parts]).sum(0),
        n_others=torch.stack([p.n_others.cpu() for p in parts]).sum(0),
        best=torch.stack([p.best.cpu() for p in parts]).amax(0),
        next_above=_merged(parts, "next_above", "min"),
        next_below=_merged(parts, "next_below", "max"),
        soft=_merged(parts, "soft", "sum"),
    )


def _check_inputs(queries: torch.Tensor, corpus: torch.Tensor) -> None:
    if queries.ndim != 2 or corpus.ndim != 2:
        raise ValueError(f"queries and corpus must be 2-D, got {tuple(queries.shape)} and {tuple(corpus.shape)}")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"dimension mismatch: queries are {queries.shape[1]}-d, corpus is {corpus.shape[1]}-d")


@torch.inference_mode()
def target_scores(queries: torch.Tensor, corpus: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each query's best exact (float64) score among its target rows of ``corpus`` (-inf for a query with none
    here), on the CPU.

    >>> target_scores(torch.tensor([[1.0, 0.0]]), torch.eye(2), [[0, 1]]).tolist()
    [1.0]
    """
    _check_inputs(queries, corpus)
    q = scan_queries(queries.to(corpus.device), corpus)
    tq, tr = to_device(_pairs(targets, q.shape[0], corpus.shape[0], "targets"), corpus.device)
    return _best_target_scores(q, corpus, tq, tr).cpu()


def _best_target_scores(q: torch.Tensor, corpus: torch.Tensor, tq: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    """Device part of :func:`target_scores`: (query, row) pairs already on the corpus' device; stays there."""
    best = torch.full((q.shape[0],), float("-inf"), dtype=torch.float64, device=corpus.device)
    if tq.numel():
        best.scatter_reduce_(0, tq, pair_scores(q[tq], corpus[tr]), reduce="amax")
    return best


def _use_fused(corpus: torch.Tensor) -> bool:
    """Whether the scan of ``corpus`` takes the fused max-and-count kernel (:func:`~.rank_kernels.use_fused`)."""
    return use_fused(corpus.device)


def column_sums(corpus: torch.Tensor) -> torch.Tensor:
    """The float64 sum of the corpus rows: every query's summed similarity is one dot product with it.

    >>> column_sums(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).tolist()
    [1.5, 0.5]
    """
    return corpus.sum(0, dtype=torch.float64)


@torch.inference_mode()
def scan_counts(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    thresholds: torch.Tensor,
    masked: Sequence[Sequence[int]],
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    corpus_sum: torch.Tensor | None = None,
    corpus_norm: float | None = None,
    extras: ScanExtras = NO_EXTRAS,
) -> ScanCounts:
    """Scan ``corpus`` in chunks: per query, the items (other than its ``masked`` rows) scoring above its threshold.

    The summed similarity (for the mean) is computed in float64 as ``q . sum(corpus) - sum(q . masked)`` from the
    unrounded query, so it does not depend on how the corpus is chunked or sharded (beyond float64 rounding).

    Args:
        thresholds: (Q,) each query's best target score (:func:`target_scores`; float64 keeps ties exact).
        masked: per query, the rows of this corpus left out (its targets and exclusions held here).
        corpus_sum: :func:`column_sums` of ``corpus`` when the caller keeps it (an index does); else computed.
        corpus_norm: :func:`max_row_norm` of ``corpus`` when the caller keeps it; else computed.
        extras: what else to gather (:class:`ScanExtras`; the merged parts of a partition must all gather the same).
    """
    _check_inputs(queries, corpus)
    scan = _ScanPlan.make(queries.shape[0], corpus, masked, chunk_elements)
    return _scan(queries.to(device=corpus.device), corpus, to_device(thresholds, corpus.device), scan, corpus_sum,
                 corpus_norm, extras)


@dataclass(frozen=True)
class _ScanPlan:
    """What the host works out before a scan: masked pairs (on the device) and where each chunk's pairs start."""

    mq: torch.Tensor
    mr: torch.Tensor
    """Masked (query, row) pairs, deduplicated and sorted by row (on the corpus' device)."""
    starts: list[int]
    """First corpus row of each chunk."""
    step: int
    bounds: list[int]
    """Chunk ``k``'s masked pairs are ``mq[bounds[k]:bounds[k + 1]]``."""
    n_others: torch.Tensor
    """Per query, the items of this corpus not masked for it (on the CPU)."""

    @classmethod
    def make(cls, num_queries: int, corpus: torch.Tensor, masked: Sequence[Sequence[int]],
             chunk_elements: int) -> _ScanPlan:
        num_items = corpus.shape[0]
        # A row that is a target and excluded is left out once; sorted by row, each chunk's pairs are a slice found
        # here, so the device loop never waits for the host.
        pairs = _pairs(masked, num_queries, num_items, "masked rows")
        keys = torch.unique(pairs[1] * num_queries + pairs[0])  # sorted by row, then query
        rows, queries = keys // num_queries, keys % num_queries
        step = chunk_rows(num_queries, chunk_elements)
        starts = list(range(0, num_items, step))
        bounds = torch.searchsorted(rows, torch.tensor([*starts, num_items])).tolist()
        mq, mr = to_device(torch.stack([queries, rows]), corpus.device)
        return cls(mq, mr, starts, step, bounds, num_items - torch.bincount(queries, minlength=num_queries))


def _scan(q: torch.Tensor, corpus: torch.Tensor, thresholds: torch.Tensor, scan: _ScanPlan,
          corpus_sum: torch.Tensor | None, corpus_norm: float | None, extras: ScanExtras = NO_EXTRAS) -> ScanCounts:
    """:func:`_scan_on_device`, then its results to the host."""
    count_above, total, best, found = _scan_on_device(q, corpus, thresholds, scan, corpus_sum, corpus_norm, extras)
    return ScanCounts(count_above.cpu(), total.cpu(), scan.n_others, best.cpu(),
                      **{name: value.cpu() for name, value in found.items()})


def _scan_on_device(q: torch.Tensor, corpus: torch.Tensor, thresholds: torch.Tensor, scan: _ScanPlan,
                    corpus_sum: torch.Tensor | None, corpus_norm: float | None, extras: ScanExtras = NO_EXTRAS,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The scan itself. The host waits for the device only in a chunk whose float32 scores come within rounding
    of a threshold (:func:`tie_band`): those few scores are located and decided exactly.

    Returns per query, on the device: the count above the threshold, the float64 summed score, the best score, and
    the :class:`ScanExtras` asked for (``next_above``, ``next_below``, ``soft``) by name.
    """
    device = corpus.device
    num_queries = q.shape[0]
    mq, mr = scan.mq, scan.mr
    q64 = q.to(torch.float64)
    total = q64 @ (corpus_sum if corpus_sum is not None else column_sums(corpus)).to(device)
    total.index_add_(0, mq, (q64[mq] * corpus[mr].to(torch.float64)).sum(1), alpha=-1)
    q = scan_queries(q, corpus)
    exact = thresholds.to(torch.float64)
    low, high = tie_band(exact, to_device(scan_error_bound(q, corpus, corpus_norm), device))
    count_above = torch.zeros(num_queries, dtype=torch.long, device=device)
    best = torch.full((num_queries,), float("-inf"), device=device)
    masked_score = torch.full((), float("-inf"), device=device)  # a device scalar: a Python float would be copied
    fused = _use_fused(corpus)
    found: dict[str, torch.Tensor] = {}
    if extras.neighbours:
        found["next_above"] = torch.full((num_queries,), float("inf"), dtype=torch.float64, device=device)
        found["next_below"] = torch.full((num_queries,), float("-inf"), dtype=torch.float64, device=device)
    if extras.soft_temperature is not None:
        found["soft"] = torch.zeros(num_queries, dtype=torch.float64, device=device)
        soft_threshold = exact.to(torch.float32)[:, None]
        soft_scale = 1.0 / extras.soft_temperature
    for k, start in enumerate(scan.starts):
        scores = score_block(q, corpus[start:start + scan.step])
        lo, hi = scan.bounds[k], scan.bounds[k + 1]
        if hi > lo:  # leave the masked pairs out
            scores.index_put_((mq[lo:hi], mr[lo:hi] - start), masked_score)
        above = None
        if fused:  # max and both counts in one read of the chunk (Triton)
            chunk_best, above_high, above_low = row_max_count(scores, high, low)
        else:
            chunk_best = scores.amax(1)
            above = scores.gt(high[:, None])
            above_high = above.sum(1)
            above_low = scores.gt(low[:, None]).sum(1)
        best = torch.maximum(best, chunk_best)
        count_above += above_high
        if extras.neighbours:  # surely above (float32 > high) and surely not above (<= low); the band comes below
            above = scores.gt(high[:, None]) if above is None else above
            found["next_above"] = torch.minimum(found["next_above"],
                                                scores.masked_fill(~above, float("inf")).amin(1).to(torch.float64))
            found["next_below"] = torch.maximum(found["next_below"], scores.masked_fill(
                scores.gt(low[:, None]), float("-inf")).amax(1).to(torch.float64))
        if extras.soft_temperature is not None:  # masked pairs score -inf: their sigmoid is 0
            found["soft"] += torch.sigmoid((scores - soft_threshold) * soft_scale).sum(1, dtype=torch.float64)
        if bool((above_low > above_high).any()):  # near-ties in this chunk: decide them exactly
            bq, bc = ((scores > low[:, None]) & (scores <= high[:, None])).nonzero(as_tuple=True)
            band = pair_scores(q[bq], corpus[start + bc])
            wins = band > exact[bq]
            count_above += torch.bincount(bq[wins], minlength=num_queries)
            if extras.neighbours:
                found["next_above"].scatter_reduce_(0, bq[wins], band[wins], reduce="amin")
                found["next_below"].scatter_reduce_(0, bq[~wins], band[~wins], reduce="amax")
    return count_above, total, best, found


def finish_rank(counts: ScanCounts, target_sim: torch.Tensor) -> RankStats:
    """Turn merged scan counts and the best target scores (float64, as the scan compared them) into
    :class:`RankStats`."""
    n_others = counts.n_others
    mean_sim = torch.where(n_others > 0, counts.total / n_others.clamp(min=1), torch.zeros_like(counts.total))
    best = torch.where(n_others > 0, counts.best, torch.full_like(counts.best, -1.0))
    t = target_sim.to(torch.float64)
    gap_above = gap_below = None
    if counts.next_above is not None and counts.next_below is not None:
        gap_above = (counts.next_above - t).clamp(min=0.0)  # inf where nothing is above
        gap_below = (t - counts.next_below).clamp(min=0.0)  # inf where nothing is below
    return RankStats(rank=counts.count_above + 1, n=n_others + 1, target_sim=target_sim.to(torch.float32),
                     mean_sim=mean_sim.to(torch.float32), best_nontarget_sim=best.to(torch.float32),
                     gap_above=gap_above, gap_below=gap_below, soft_count=counts.soft)


@torch.inference_mode()
def corpus_rank(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    targets: Sequence[Sequence[int]],
    excluded: Sequence[Sequence[int]] | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    corpus_sum: torch.Tensor | None = None,
    corpus_norm: float | None = None,
    extras: ScanExtras = NO_EXTRAS,
) -> RankStats:
    """Rank each query's best target among the whole corpus.

    Args:
        queries: (Q, D) L2-normalised query embeddings.
        corpus: (N, D) L2-normalised corpus embeddings (any float dtype; scored in float32
            on the corpus' device).
        targets: for each query, the corpus rows of its targets (at least one).
        excluded: for each query, corpus rows left out of the ranking (e.g. CIRR's reference image).
        chunk_elements: at most this many query x corpus scores are held at once.
        corpus_sum: :func:`column_sums` of ``corpus``, when the caller keeps it.
        corpus_norm: :func:`max_row_norm` of ``corpus``, when the caller keeps it.
        extras: what else the scan gathers for graded ranks (:class:`ScanExtras`).

    >>> c = torch.eye(4)
    >>> q = torch.tensor([[0.6, 0.8, 0.0, 0.0]])
    >>> s = corpus_rank(q, c, targets=[[0]])
    >>> int(s.rank[0]), int(s.n[0])
    (2, 4)
    >>> int(corpus_rank(q, c, targets=[[0]], excluded=[[1]]).rank[0])
    1
    """
    _check_inputs(queries, corpus)
    for i, t in enumerate(targets):
        if len(t) == 0:
            raise ValueError(f"query {i} has no target")
    excluded = excluded if excluded is not None else [[] for _ in targets]
    if len(excluded) != len(targets):
        raise ValueError(f"excluded: got {len(excluded)} lists for {len(targets)} queries")
    num_queries = queries.shape[0]
    masked = [list(t) + list(e) for t, e in zip(targets, excluded)]
    scan = _ScanPlan.make(num_queries, corpus, masked, chunk_elements)
    tq, tr = to_device(_pairs(targets, num_queries, corpus.shape[0], "targets"), corpus.device)
    q = queries.to(device=corpus.device)
    thresholds = _best_target_scores(scan_queries(q, corpus), corpus, tq, tr)
    return finish_rank(_scan(q, corpus, thresholds, scan, corpus_sum, corpus_norm, extras), thresholds.cpu())
