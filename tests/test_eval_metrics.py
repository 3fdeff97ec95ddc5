"""Recall@K, CIRR Recall_subset ranks and submissions: hand-computed cases and a brute-force reference."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grape_rewards.eval import (
    CIRR_RECALL_KS,
    CIRR_SUBSET_KS,
    cirr_submission,
    recall_at_k,
    subset_rank,
    subset_ranks,
    top_k_ids,
    write_cirr_submissions,
)
from grape_rewards.eval import metrics as metrics_module

# ------------------------------------------------------------------------- brute-force reference


def brute_force_rank(scores: Mapping[str, float], targets: Collection[str], excluded: Collection[str] = ()) -> int:
    """Sort the non-excluded candidates best first, targets before equal-scoring others; 1 + first target's index."""
    candidates = [c for c in scores if c not in excluded]
    ordered = sorted(candidates, key=lambda c: (-scores[c], c not in targets))
    return 1 + next(i for i, c in enumerate(ordered) if c in targets)


def brute_force_recall(ranks: list[int], k: int) -> float:
    hits = 0
    for r in ranks:
        if r <= k:
            hits += 1
    return 100.0 * hits / len(ranks)


# ------------------------------------------------------------------------------------ recall@k


def test_recall_at_k_hand_computed() -> None:
    assert recall_at_k([1, 1, 1, 1]) == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "mean": 100.0}
    assert recall_at_k([2, 5, 10, 11]) == {"R@1": 0.0, "R@5": 50.0, "R@10": 75.0, "mean": 125.0 / 3}
    out = recall_at_k(np.array([1, 3, 50, 51]), ks=CIRR_RECALL_KS)
    assert out == {"R@1": 25.0, "R@5": 50.0, "R@10": 50.0, "R@50": 75.0, "mean": 50.0}
    assert recall_at_k(torch.tensor([1, 4]), ks=(3,)) == {"R@3": 50.0, "mean": 50.0}
    assert list(recall_at_k([1], ks=(10, 1))) == ["R@10", "R@1", "mean"]


@pytest.mark.parametrize("ranks", [[], [0, 1], [1.5], [-1], [float("nan")], [[1, 2]], ["1"]])
def test_recall_at_k_rejects_bad_ranks(ranks: list[object]) -> None:
    with pytest.raises(ValueError):
        recall_at_k(ranks)  # type: ignore[arg-type]


@pytest.mark.parametrize("ks", [(), (0,), (1, 1), (True,), (2.5,)])
def test_recall_at_k_rejects_bad_ks(ks: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        recall_at_k([1, 2], ks=ks)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=40),
       st.lists(st.integers(1, 60), min_size=1, max_size=5, unique=True))
def test_recall_at_k_matches_brute_force(ranks: list[int], ks: list[int]) -> None:
    out = recall_at_k(ranks, ks=ks)
    for k in ks:
        assert out[f"R@{k}"] == pytest.approx(brute_force_recall(ranks, k))
    assert out["mean"] == pytest.approx(sum(out[f"R@{k}"] for k in ks) / len(ks))
    assert all(0.0 <= v <= 100.0 for v in out.values())


# ------------------------------------------------------------------------------- subset rank


def test_subset_rank_hand_computed() -> None:
    scores = {"a": 0.9, "t": 0.5, "b": 0.5, "c": 0.1, "d": 0.7}
    assert subset_rank(scores, "t") == 3  # a and d score strictly higher; b ties and does not count
    assert subset_rank({"t": 0.3, "x": 0.3, "y": 0.3}, "t") == 1  # all ties: the target's favour
    assert subset_rank({"t": 1.0}, "t") == 1
    assert subset_ranks([scores, {"t": 0.0, "z": -1.0}], ["t", "t"]) == [3, 1]


def test_reference_exclusion_pitfall() -> None:
    """A composed query fused from its reference image resembles the reference most; it must not count."""
    scores = {"ref": 0.95, "t": 0.80, "m1": 0.40, "m2": 0.30, "m3": 0.20, "m4": 0.10}
    assert subset_rank(scores, "t", reference_id="ref") == 1
    assert brute_force_rank(scores, {"t"}) == 2  # what an implementation that forgets the exclusion gets
    assert subset_ranks([scores], ["t"], ["ref"]) == [1]
    r_excluded = recall_at_k([subset_rank(scores, "t", reference_id="ref")], ks=CIRR_SUBSET_KS)
    r_forgot = recall_at_k([brute_force_rank(scores, {"t"})], ks=CIRR_SUBSET_KS)
    assert r_excluded["R@1"] == 100.0 and r_forgot["R@1"] == 0.0
    with pytest.raises(ValueError):
        subset_rank(scores, "ref", reference_id="ref")


def test_full_gallery_pitfall() -> None:
    """Recall@K ranks the split's whole gallery (minus the reference), not the subset or the images queries name."""
    gallery = {"ref": 0.99, "t": 0.70, "s1": 0.60, "s2": 0.50, "s3": 0.40, "s4": 0.30,
               "other1": 0.95, "other2": 0.90, "other3": 0.75}  # images no query mentions
    subset = {k: gallery[k] for k in ("t", "s1", "s2", "s3", "s4")}
    full_rank = brute_force_rank(gallery, {"t"}, excluded={"ref"})
    assert full_rank == 4
    assert subset_rank(subset, "t") == 1  # Recall_subset is legitimately easier ...
    assert recall_at_k([full_rank], ks=(1,))["R@1"] == 0.0  # ... but Recall@1 must not be computed on it
    assert recall_at_k([subset_rank(subset, "t")], ks=(1,))["R@1"] == 100.0


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from([f"m{i}" for i in range(8)]), st.integers(-3, 3), min_size=1, max_size=8),
    st.data(),
)
def test_subset_rank_matches_brute_force(raw: dict[str, int], data: st.DataObject) -> None:
    scores = {k: v / 4 for k, v in raw.items()}  # few distinct values: many ties
    keys = sorted(scores)
    target = data.draw(st.sampled_from(keys))
    reference = data.draw(st.sampled_from([None, *[k for k in keys if k != target]]))
    expected = brute_force_rank(scores, {target}, excluded={reference} if reference else set())
    assert subset_rank(scores, target, reference_id=reference) == expected
    # Removing candidates can only help the target: the subset rank is never worse than the gallery rank.
    kept = {k: v for k, v in scores.items() if k == target or data.draw(st.booleans())}
    assert subset_rank(kept, target, reference_id=reference) <= expected


def test_subset_rank_errors() -> None:
    with pytest.raises(ValueError, match="target"):
        subset_rank({"a": 1.0}, "t")
    with pytest.raises(ValueError, match="NaN"):
        subset_rank({"t": float("nan"), "a": 1.0}, "t")
    with pytest.raises(ValueError):
        subset_ranks([{"t": 1.0}], ["t", "t"])


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 20), st.integers(1, 6), st.integers(0, 10_000))
def test_same_convention_as_core_rank(num_items: int, num_queries: int, seed: int) -> None:
    """subset_rank over the whole gallery agrees with grape_rewards.corpus.rank.corpus_rank, ties included."""
    from grape_rewards.corpus.rank import corpus_rank
    g = torch.Generator().manual_seed(seed)
    corpus = torch.nn.functional.one_hot(torch.randint(0, 3, (num_items,), generator=g), 3).float()  # many ties
    queries = torch.nn.functional.normalize(torch.rand(num_queries, 3, generator=g) + 0.01, dim=-1)
    targets = [[int(torch.randint(0, num_items, (1,), generator=g))] for _ in range(num_queries)]
    excluded = [[(t[0] + 1) % num_items] for t in targets]
    core = corpus_rank(queries, corpus, targets, excluded).rank.tolist()
    ids = [f"c{i}" for i in range(num_items)]
    for qi in range(num_queries):
        scores = dict(zip(ids, (queries[qi] @ corpus.T).tolist()))
        ref = ids[excluded[qi][0]]
        mine = subset_rank(scores, ids[targets[qi][0]], reference_id=ref)
        assert mine == core[qi] == brute_force_rank(scores, {ids[targets[qi][0]]}, excluded={ref})


# ------------------------------------------------------------------------------------- top-k ids


def test_top_k_ids() -> None:
    ids = ["ref", "a", "b", "c", "d"]
    assert top_k_ids(ids, [0.9, 0.5, 0.7, 0.5, 0.1], 3, exclude={"ref"}) == ["b", "a", "c"]
    assert top_k_ids(ids, [0.9, 0.5, 0.7, 0.5, 0.1], 10) == ["ref", "b", "a", "c", "d"]
    assert top_k_ids(ids, np.zeros(5), 2) == ["ref", "a"]  # ties keep gallery order
    with pytest.raises(ValueError):
        top_k_ids(ids, [0.1, 0.2], 1)


# ---------------------------------------------------------------------------- CIRR submissions


def gallery_ids(n: int = 60) -> list[str]:
    return [f"test1-{i}-0-img{i % 2}" for i in range(n)]


def test_cirr_submission_format() -> None:
    ids = gallery_ids()
    recall = cirr_submission([12063, 12064], [ids, ids[::-1]], "recall")
    assert list(recall)[:2] == ["version", "metric"]
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert recall["12063"] == ids[:50] and recall["12064"] == ids[::-1][:50]
    subset = cirr_submission(["12063"], [ids[:5]], "recall_subset")
    assert subset == {"version": "rc2", "metric": "recall_subset", "12063": ids[:3]}


def test_cirr_submission_drops_reference_before_truncating() -> None:
    ids = gallery_ids()
    out = cirr_submission([1], [ids], "recall", reference_ids=[ids[0]])
    assert out["1"] == ids[1:51] and ids[0] not in out["1"]
    out = cirr_submission([1], [["r", "a", "b", "c"]], "recall_subset", reference_ids=["r"])
    assert out["1"] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("pairids", "rankings", "metric", "refs"),
    [([1], [gallery_ids(49)], "recall", None),  # fewer than 50
     ([1], [["a", "b", "r"]], "recall_subset", ["r"]),  # fewer than 3 once the reference is gone
     ([1], [["a", "a", "b"]], "recall_subset", None),  # repeated ids
     ([1, 1], [["a", "b", "c"], ["a", "b", "c"]], "recall_subset", None),  # duplicate pairid
     ([1], [["a", "b", "c"]], "recall@k", None),
     ([1, 2], [["a", "b", "c"]], "recall_subset", None),
     ([1], [["a", "b", "c"]], "recall_subset", ["r", "s"])],
)
def test_cirr_submission_errors(pairids: list[int], rankings: list[list[str]], metric: str,
                                refs: list[str] | None) -> None:
    with pytest.raises(ValueError):
        cirr_submission(pairids, rankings, metric, reference_ids=refs)  # type: ignore[arg-type]


def test_write_cirr_submissions(tmp_path: Path) -> None:
    ids = gallery_ids()
    prefix = tmp_path / "out" / "test1_pred_ranks"
    paths = write_cirr_submissions(prefix, [7, 8], [ids, ids[5:]], [ids[:5], ids[5:10]], reference_ids=[ids[0], None])
    assert paths == (tmp_path / "out" / "test1_pred_ranks_recall.json",
                     tmp_path / "out" / "test1_pred_ranks_recall_subset.json")
    recall = json.loads(paths[0].read_text())
    subset = json.loads(paths[1].read_text())
    assert recall["metric"] == "recall" and recall["7"] == ids[1:51] and recall["8"] == ids[5:55]
    assert subset == {"version": "rc2", "metric": "recall_subset", "7": ids[1:4], "8": ids[5:8]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]  # no temp files


def test_write_cirr_submissions_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = gallery_ids()
    prefix = tmp_path / "sub"
    write_cirr_submissions(prefix, [7], [ids], [ids[:3]])
    before = (tmp_path / "sub_recall.json").read_text()

    def broken_dump(obj: object, f: object) -> None:
        f.write('{"version": "rc2", "metr')  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(metrics_module.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_cirr_submissions(prefix, [9], [ids[::-1]], [ids[:3]])
    assert (tmp_path / "sub_recall.json").read_text() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub_recall.json", "sub_recall_subset.json"]
