"""Graded ranks (margin, soft): the scan's extra statistics against a numpy recomputation, their merge over shards,
the reward's required properties, and the scorer end to end."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grape_rewards.corpus import ScanExtras, corpus_rank, merge_counts, scan_counts, target_scores
from grape_rewards.corpus.rank import finish_rank
from grape_rewards.rewards import RewardConfig, rank_reward
from grape_rewards.rewards.composite import score_sample
from grape_rewards.rewards.format import Extraction
from grape_rewards.rewards.graded_rank import graded_rank, interpolated_rank, soft_rank

BOTH = ScanExtras(neighbours=True, soft_temperature=0.05)


def numpy_reference(q: np.ndarray, c: np.ndarray, targets: list[list[int]], excluded: list[list[int]],
                    temperature: float) -> list[dict[str, float]]:
    """The definitions, item by item, on a float64 score matrix."""
    scores = q.astype(np.float64) @ c.astype(np.float64).T
    out = []
    for i, row in enumerate(scores):
        t = max(row[j] for j in targets[i])
        others = np.array([row[j] for j in range(len(row)) if j not in set(targets[i]) | set(excluded[i])])
        above, below = others[others > t], others[others <= t]
        out.append({
            "rank": 1 + len(above),
            "n": len(others) + 1,
            "gap_above": float(above.min() - t) if len(above) else math.inf,
            "gap_below": float(t - below.max()) if len(below) else math.inf,
            "soft_count": float((1.0 / (1.0 + np.exp(-(others - t) / temperature))).sum()),
        })
    return out


def random_problem(seed: int, n: int = 300, d: int = 16, nq: int = 12):
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1)
    rng = np.random.default_rng(seed)
    targets = [rng.choice(n, size=rng.integers(1, 3), replace=False).tolist() for _ in range(nq)]
    excluded = [rng.choice(n, size=rng.integers(0, 3), replace=False).tolist() for _ in range(nq)]
    return q, c, targets, excluded


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1 << 24, 97])
def test_scan_extras_match_numpy(seed: int, chunk: int) -> None:
    q, c, targets, excluded = random_problem(seed)
    q[0] = c[targets[0][0]]  # a query at its own target: rank 1 with a real margin
    stats = corpus_rank(q, c, targets, excluded, chunk_elements=chunk, extras=BOTH)
    for i, want in enumerate(numpy_reference(q.numpy(), c.numpy(), targets, excluded, 0.05)):
        assert int(stats.rank[i]) == want["rank"]
        assert int(stats.n[i]) == want["n"]
        for name in ("gap_above", "gap_below"):
            got = float(getattr(stats, name)[i])
            assert got == pytest.approx(want[name], abs=2e-6) if math.isfinite(want[name]) else got == math.inf
        assert float(stats.soft_count[i]) == pytest.approx(want["soft_count"], rel=1e-4, abs=1e-5)


def test_a_plain_scan_carries_no_extras() -> None:
    q, c, targets, excluded = random_problem(0)
    stats = corpus_rank(q, c, targets, excluded)
    assert stats.gap_above is None and stats.gap_below is None and stats.soft_count is None


def test_an_exact_duplicate_of_the_target_is_a_tie_at_the_rank_2_boundary() -> None:
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    stats = corpus_rank(torch.tensor([[1.0, 0.0]]), c, targets=[[0]], extras=BOTH)
    assert int(stats.rank[0]) == 1
    assert float(stats.gap_below[0]) == 0.0  # the twin scores exactly the target's score: not above, zero gap
    assert float(stats.gap_above[0]) == math.inf
    assert graded_rank("margin", 1, 3, gap_above=math.inf, gap_below=0.0, temperature=0.05) == 2.0


@pytest.mark.parametrize("seed", [0, 3])
def test_extras_merge_over_a_partition_like_one_scan(seed: int) -> None:
    """Shards: each part scanned alone, then merged, gives the one-scan statistics (min, max and sum)."""
    q, c, targets, excluded = random_problem(seed)
    whole = corpus_rank(q, c, targets, excluded, extras=BOTH)
    thresholds = target_scores(q, c, targets)
    cut = [0, 70, 71, 300]
    parts = []
    for lo, hi in itertools.pairwise(cut):
        masked = [[r - lo for r in list(t) + list(e) if lo <= r < hi] for t, e in zip(targets, excluded)]
        parts.append(scan_counts(q, c[lo:hi], thresholds, masked, extras=BOTH))
    merged = finish_rank(merge_counts(parts), thresholds)
    assert torch.equal(merged.rank, whole.rank)
    # Scores are float32 matrix products, whose last bits may depend on the block shape: near, not bit-equal.
    assert torch.allclose(merged.gap_above, whole.gap_above, atol=1e-6, rtol=0)
    assert torch.allclose(merged.gap_below, whole.gap_below, atol=1e-6, rtol=0)
    assert torch.allclose(merged.soft_count, whole.soft_count, rtol=1e-5)


def test_parts_scanned_with_different_extras_refuse_to_merge() -> None:
    q, c, targets, _ = random_problem(0)
    thresholds = target_scores(q, c, targets)
    masked = [list(t) for t in targets]
    with pytest.raises(ValueError, match="same extras"):
        merge_counts([scan_counts(q, c, thresholds, masked, extras=BOTH), scan_counts(q, c, thresholds, masked)])


# -- the reward's required properties ----------------------------------------------------------------------------
gaps = st.floats(0.0, 2.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 5000), data=st.data(), a=gaps, b=gaps, a2=gaps, b2=gaps,
       shape=st.sampled_from(["linear", "reciprocal", "log", "loglinear"]), t=st.floats(1e-3, 1.0))
def test_margin_reward_is_bounded_and_never_higher_for_a_worse_rank(n, data, a, b, a2, b2, shape, t) -> None:
    r = data.draw(st.integers(1, n - 1))
    worse = data.draw(st.integers(r + 1, n))
    a = a if r > 1 else math.inf
    b2 = b2 if worse < n else math.inf
    rho = interpolated_rank(r, n, a if a > 0 else 1e-12, b, t)
    rho_worse = interpolated_rank(worse, n, a2 if a2 > 0 else 1e-12, b2, t)
    assert 1.0 <= rho <= n and 1.0 <= rho_worse <= n
    reward, reward_worse = rank_reward(rho, n, shape), rank_reward(rho_worse, n, shape)
    assert 0.0 <= reward_worse <= reward <= 1.0


def test_margin_reward_at_rank_1_grows_with_the_margin_and_meets_rank_2_at_a_tie() -> None:
    n, t = 2400, 0.05
    margins = [0.0, 1e-4, 0.01, 0.05, 0.2, 1.0]
    rewards = [rank_reward(interpolated_rank(1, n, math.inf, m, t), n, "log") for m in margins]
    assert all(x < y for x, y in itertools.pairwise(rewards))
    assert rewards[-1] < 1.0
    # Continuous across the rank step: rank 1 at a zero margin and rank 2 with the item above at zero gap coincide.
    assert interpolated_rank(1, n, math.inf, 0.0, t) == 2.0
    assert interpolated_rank(2, n, 1e-15, 0.3, t) == pytest.approx(2.0)
    # Within a rank below 1, the nearer the item above, the lower the graded rank.
    assert interpolated_rank(5, n, 0.001, 0.1, t) < interpolated_rank(5, n, 0.05, 0.1, t)


def test_loglinear_is_not_flat_deep_in_the_ranking() -> None:
    n = 2400
    assert rank_reward(100, n, "log") - rank_reward(2400, n, "log") < 0.07
    assert rank_reward(100, n, "loglinear") - rank_reward(2400, n, "loglinear") > 0.4


def test_soft_rank_is_kept_in_range() -> None:
    assert soft_rank(0.0, 5) == 1.0 and soft_rank(10.0, 5) == 5.0
    with pytest.raises(ValueError):
        soft_rank(-0.1, 5)


def test_recall_at_k_is_refused_with_a_graded_rank() -> None:
    with pytest.raises(ValueError, match="recall@k shape is a step"):
        RewardConfig(shape="recall@k", rank_mode="margin")


@pytest.mark.parametrize("relative", [False, True])
def test_score_sample_margin_mode_matches_the_formula(relative: bool) -> None:
    config = RewardConfig(rank_mode="margin", temperature=0.1, shape="loglinear", relative=relative)
    out = score_sample(config, Extraction("a dog", "ok"), rank=1, n=100, target_sim=0.8, mean_sim=0.1,
                       best_nontarget_sim=0.7, gap_above=math.inf, gap_below=0.1, original_rank=3.5)
    rho = 1 + 0.1 / (0.1 + 0.1)
    want = 1 - math.log(rho) / math.log(100) - ((1 - math.log(3.5) / math.log(100)) if relative else 0.0)
    assert out["graded_rank"] == pytest.approx(rho)
    assert out["reward"] == pytest.approx(want)
    failed = score_sample(config, Extraction("", "empty"), rank=100, n=100, target_sim=0.0, mean_sim=0.0,
                          best_nontarget_sim=0.0, original_rank=3.5)
    assert failed["reward"] == config.format.invalid_reward and failed["graded_rank"] == 100.0


def test_scorer_margin_and_soft_rewards_match_numpy(minilm) -> None:
    """The whole path: encode, scan with extras, graded rank, shape, against numpy on the same embeddings."""
    from grape_rewards.corpus import CorpusIndex
    from grape_rewards.scorer import RewardItem, RewardScorer

    colours, things = ["red", "blue", "green", "white", "black"], ["car", "dog", "kite", "boat", "chair", "lamp"]
    texts = [f"a {colour} {thing} in picture {i}" for i, (colour, thing) in
             enumerate((c, t) for c in colours for t in things)]
    index = CorpusIndex(minilm.encode_texts(texts), [f"c{i}" for i in range(len(texts))])
    rewrites = ["a red car", "a blue dog in a picture", "a green kite in picture 13", "a chair", "nothing at all"]
    targets = [["c0"], ["c7"], ["c14"], ["c28"], ["c9"]]
    emb = minilm.encode_texts(rewrites).numpy()
    rows = [[int(t[0][1:])] for t in targets]
    for mode, temperature in (("margin", 0.02), ("soft", 0.03)):
        config = RewardConfig(rank_mode=mode, temperature=temperature, shape="log")
        scorer = RewardScorer(minilm, index, config)
        got = scorer.score([RewardItem(rewrite=r, target_ids=t) for r, t in zip(rewrites, targets)])
        ref = numpy_reference(emb, index.embeddings.float().numpy(), rows, [[] for _ in rows], temperature)
        for sample, want in zip(got, ref):
            rho = (interpolated_rank(want["rank"], want["n"], want["gap_above"], want["gap_below"], temperature)
                   if mode == "margin" else soft_rank(want["soft_count"], want["n"]))
            assert sample["rank"] == want["rank"]
            assert sample["graded_rank"] == pytest.approx(rho, abs=1e-4)
            assert sample["reward"] == pytest.approx(rank_reward(rho, want["n"], "log"), abs=1e-5)


def test_cli_score_takes_the_rank_mode_and_temperature(demo_index_dir, tmp_path) -> None:
    import json

    from grape_rewards.cli import main

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"rewrite": "a brown dog catches a frisbee in a sunny park", "target_ids": ["cap000"]})
                    + "\n")
    for mode, temperature in (("margin", "0.1"), ("soft", "0.02")):
        out = tmp_path / f"{mode}.jsonl"
        assert main(["score", "--index", str(demo_index_dir), "--input", str(rows), "--output", str(out), "--quiet",
                     "--shape", "loglinear", "--rank-mode", mode, "--temperature", temperature]) == 0
        sample = json.loads(out.read_text())
        assert sample["rank"] == 1.0 and 1.0 <= sample["graded_rank"] < 2.0
        assert sample["reward"] == pytest.approx(1 - math.log(sample["graded_rank"]) / math.log(sample["n"]))
    assert main(["score", "--index", str(demo_index_dir), "--input", str(rows), "--output", str(tmp_path / "x.jsonl"),
                 "--quiet", "--shape", "recall@k", "--rank-mode", "margin"]) == 2  # a step takes the plain rank
