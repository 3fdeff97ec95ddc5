"""The chunked exact rank against a brute-force reference, and the rank-shaped rewards."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grape_rewards.corpus import corpus_rank
from grape_rewards.rewards import (
    linear_rank_reward,
    log_rank_reward,
    rank_reward,
    recall_at_k_reward,
    reciprocal_rank_reward,
    relative_rank_reward,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""On a GPU, the half-precision corpus is scored on tensor cores with float32 accumulation (another code path)."""


def brute_force(q: torch.Tensor, c: torch.Tensor, targets: list[list[int]], excluded: list[list[int]]):
    """Full score matrix, then the definition, item by item."""
    scores = (q.double() @ c.double().T).tolist()
    out = []
    for i, row in enumerate(scores):
        t_best = max(row[t] for t in targets[i])
        others = [j for j in range(len(row)) if j not in set(targets[i]) | set(excluded[i])]
        rank = 1 + sum(1 for j in others if row[j] > t_best)
        out.append((rank, len(others) + 1, t_best,
                    sum(row[j] for j in others) / len(others) if others else 0.0,
                    max((row[j] for j in others), default=-1.0)))
    return out


@st.composite
def problems(draw):
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 4))
    nq = draw(st.integers(1, 5))
    # Small integers: every dot product is exact in float32 and float16, so ties are real ties.
    vals = st.integers(-2, 2)
    c = torch.tensor(draw(st.lists(st.lists(vals, min_size=d, max_size=d), min_size=n, max_size=n)),
                     dtype=torch.float32)
    q = torch.tensor(draw(st.lists(st.lists(vals, min_size=d, max_size=d), min_size=nq, max_size=nq)),
                     dtype=torch.float32)
    rows = st.integers(0, n - 1)
    targets = draw(st.lists(st.lists(rows, min_size=1, max_size=3), min_size=nq, max_size=nq))
    excluded = draw(st.lists(st.lists(rows, max_size=3), min_size=nq, max_size=nq))
    chunk = draw(st.integers(1, 60))
    return q, c, targets, excluded, chunk


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=300, deadline=None)
@given(problem=problems(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_rank_matches_brute_force(problem, dtype, device):
    q, c, targets, excluded, chunk = problem
    stats = corpus_rank(q.to(device), c.to(device, dtype), targets, excluded, chunk_elements=chunk)
    for i, (rank, n, t_best, mean, best) in enumerate(brute_force(q, c, targets, excluded)):
        assert int(stats.rank[i]) == rank
        assert int(stats.n[i]) == n
        assert float(stats.target_sim[i]) == pytest.approx(t_best)
        assert float(stats.mean_sim[i]) == pytest.approx(mean, abs=1e-5)
        assert float(stats.best_nontarget_sim[i]) == pytest.approx(best)


def test_ties_count_for_the_target():
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    stats = corpus_rank(torch.tensor([[1.0, 0.0]]), c, targets=[[0]])
    assert int(stats.rank[0]) == 1  # row 1 ties the target: it does not push it down


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk", [1 << 24, 700])
def test_bit_identical_duplicates_of_the_target_are_ties(device, dtype, chunk):
    """Random unit vectors (products round differently in a matrix product and an elementwise sum): a duplicate of
    the target never pushes it down, and every rank equals a float64 recomputation."""
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(600, 256, generator=g), dim=1).to(dtype)
    c[1] = c[0]
    c[599] = c[300]  # a duplicate in another chunk
    q = torch.nn.functional.normalize(torch.randn(40, 256, generator=g), dim=1)
    q[20:] = c[0].float() + 0.01 * q[20:]  # queries close to the target: ties near the top
    targets = [[0]] * 30 + [[300]] * 10
    stats = corpus_rank(q.to(device), c.to(device), targets, chunk_elements=chunk)
    seen = q.to(dtype) if (device == "cuda" and dtype == torch.float16) else q
    exact = seen.double() @ c.double().T
    t = torch.tensor([row[0] for row in targets])
    best = exact[torch.arange(40), t]
    others = exact.clone()
    others[torch.arange(40), t] = float("-inf")
    assert torch.equal(stats.rank, 1 + (others > best[:, None]).sum(1))
    assert torch.equal(stats.target_sim, best.float())


def test_several_targets_take_the_best():
    c = torch.eye(3)
    q = torch.tensor([[0.2, 0.5, 0.9]])
    assert int(corpus_rank(q, c, targets=[[0]]).rank[0]) == 3
    assert int(corpus_rank(q, c, targets=[[0, 2]]).rank[0]) == 1
    assert int(corpus_rank(q, c, targets=[[0, 2]]).n[0]) == 2


def test_single_item_and_pairs():
    one = corpus_rank(torch.ones(1, 2), torch.ones(1, 2), targets=[[0]])
    assert (int(one.rank[0]), int(one.n[0]), float(one.best_nontarget_sim[0])) == (1, 1, -1.0)
    two = corpus_rank(torch.tensor([[0.0, 1.0]]), torch.eye(2), targets=[[0]])
    assert (int(two.rank[0]), int(two.n[0])) == (2, 2)


def test_memory_is_bounded_by_the_chunk(monkeypatch):
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    q, c = torch.randn(8, 16), torch.randn(1000, 16)
    corpus_rank(q, c, targets=[[i] for i in range(8)], chunk_elements=800)
    assert seen and max(seen) <= 800


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="query 0 has no target"):
        corpus_rank(torch.ones(1, 2), torch.ones(3, 2), targets=[[]])
    with pytest.raises(ValueError, match="outside the corpus"):
        corpus_rank(torch.ones(1, 2), torch.ones(3, 2), targets=[[3]])
    with pytest.raises(ValueError, match="dimension mismatch"):
        corpus_rank(torch.ones(1, 3), torch.ones(3, 2), targets=[[0]])


@given(st.integers(1, 500), st.data())
def test_shapes_are_in_range_and_monotone(n, data):
    r = data.draw(st.integers(1, n))
    for shape in ("linear", "reciprocal", "log", "recall@k"):
        value = rank_reward(r, n, shape, k=5)
        assert 0.0 <= value <= 1.0
        assert rank_reward(1, n, shape, k=5) == 1.0
        if r < n:
            assert rank_reward(r + 1, n, shape, k=5) <= value


def test_shape_formulas():
    assert linear_rank_reward(3, 5) == 1 - 2 / 4
    assert linear_rank_reward(1, 1) == 1.0
    assert reciprocal_rank_reward(8, 10) == 1 / 8
    assert log_rank_reward(7, 10) == 1 / math.log2(8)
    assert recall_at_k_reward(5, 10, 5) == 1.0 and recall_at_k_reward(6, 10, 5) == 0.0
    assert relative_rank_reward(2, 10, 100, "reciprocal") == pytest.approx(0.5 - 0.1)
    assert relative_rank_reward(10, 2, 100, "reciprocal") == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="unknown rank shape"):
        rank_reward(1, 2, "cubic")
    with pytest.raises(ValueError, match="1 <= rank <= n"):
        rank_reward(3, 2, "log")


@pytest.mark.parametrize("device", DEVICES)
def test_float16_corpus_agrees_with_float32_except_within_its_resolution(device):
    """Ranks over a float16 corpus equal the float32 ones, except where an item's score is within float16
    resolution of the target's (the documented limit of a half-precision corpus)."""
    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1)
    queries = torch.nn.functional.normalize(corpus[:40] + 0.8 * torch.randn(40, 64, generator=g), dim=1)
    targets = [[i] for i in range(40)]
    exact = corpus_rank(queries, corpus, targets)
    half = corpus_rank(queries.to(device), corpus.to(device, torch.float16), targets)
    scores = queries @ corpus.T
    tol = 2e-3  # float16 has an 11-bit significand: |error| of a unit-vector dot product stays below this
    for i in range(40):
        near = int(((scores[i] - scores[i, i]).abs() < tol).sum()) - 1
        assert abs(int(half.rank[i]) - int(exact.rank[i])) <= near
    assert (half.rank == exact.rank).float().mean() >= 0.85  # most ranks are untouched


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(1, 4), st.data())
def test_rank_is_additive_over_shards(problem, num_shards, data):
    """Sharded: 1 + the sum over shards of the items above the best target, merged, equals the global rank."""
    from grape_rewards.corpus import finish_rank, merge_counts, scan_counts, target_scores

    q, c, targets, excluded, chunk = problem
    n = c.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=num_shards - 1, max_size=num_shards - 1)))
    bounds = list(zip([0, *cuts], [*cuts, n]))
    local = [[[r - lo for r in rows if lo <= r < hi] for rows in per_query] for lo, hi in bounds
             for per_query in [targets]]
    thresholds = torch.stack([target_scores(q, c[lo:hi], local[i]) for i, (lo, hi) in enumerate(bounds)]).amax(0)
    parts = []
    for lo, hi in bounds:
        masked = [[r - lo for r in list(t) + list(e) if lo <= r < hi] for t, e in zip(targets, excluded)]
        parts.append(scan_counts(q, c[lo:hi], thresholds, masked, chunk))
    sharded = finish_rank(merge_counts(parts), thresholds)
    whole = corpus_rank(q, c, targets, excluded, chunk_elements=chunk)
    assert torch.equal(sharded.rank, whole.rank) and torch.equal(sharded.n, whole.n)
    assert torch.equal(sharded.mean_sim, whole.mean_sim)  # float64 dot products with the summed rows: exact
    assert torch.equal(sharded.best_nontarget_sim, whole.best_nontarget_sim)


def test_scan_counts_with_no_threshold_counts_every_unmasked_item_once():
    from grape_rewards.corpus import column_sums, scan_counts

    c = torch.randn(50, 8)
    q = torch.randn(3, 8)
    masked = [[0, 0, 7], [], [49, 3]]  # a duplicate pair is left out once
    counts = scan_counts(q, c, torch.full((3,), float("-inf")), masked, chunk_elements=7)
    assert counts.count_above.tolist() == [48, 50, 48] == counts.n_others.tolist()
    given = scan_counts(q, c, torch.zeros(3), masked, chunk_elements=7, corpus_sum=column_sums(c))
    computed = scan_counts(q, c, torch.zeros(3), masked, chunk_elements=1000)
    assert torch.equal(given.count_above, computed.count_above) and torch.equal(given.total, computed.total)
    want = (q.double() @ c.double().T)
    keep = torch.ones_like(want, dtype=torch.bool)
    keep[0, [0, 7]] = False
    keep[2, [49, 3]] = False
    assert torch.allclose(computed.total, (want * keep).sum(1), atol=1e-9)
    assert computed.count_above.tolist() == ((want > 0) & keep).sum(1).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only with a GPU")
def test_the_device_part_of_a_rank_never_waits_for_the_gpu():
    """Target scores and the whole chunked scan queue on the GPU without a single sync (no copy from pageable memory,
    no .item(), no scalar sent per chunk); results come back in one place at the end."""
    from grape_rewards.corpus import rank as rank_module
    from grape_rewards.devices import to_device

    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(5000, 32, generator=g), dim=1).half().cuda()
    q = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=1).cuda()
    targets = [[i, 4999 - i] for i in range(16)]
    masked = [[*t, 7] for t in targets]
    scan = rank_module._ScanPlan.make(16, corpus, masked, chunk_elements=16 * 700)  # 8 chunks
    tq, tr = to_device(rank_module._pairs(targets, 16, 5000, "targets"), corpus.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        thresholds = rank_module._best_target_scores(q, corpus, tq, tr)
        out = rank_module._scan_on_device(q, corpus, thresholds, scan, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = corpus_rank(q, corpus, targets, [[7]] * 16)  # the same parts, through the public function
    assert torch.equal(out[0].cpu() + 1, want.rank) and torch.equal(thresholds.cpu(), want.target_sim)
