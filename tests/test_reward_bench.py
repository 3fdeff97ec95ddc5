"""The reward benchmark: reward names, inputs and their errors, the statistics against brute force, the bootstrap,
and a run end to end through the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from grape_rewards.cli import main
from grape_rewards.eval import bootstrap
from grape_rewards.eval.judges import BM25Judge, Judgement, LabelJudge
from grape_rewards.eval.metrics import expected_recall_at_k, expected_reciprocal_rank
from grape_rewards.eval.reward_bench import (
    best_of_n,
    judge_metrics,
    kendall_tau_b,
    pair_counts,
    parse_reward,
    pearson,
    run_reward_bench,
    score_candidates,
)
from grape_rewards.eval.reward_bench_data import (
    BenchCandidate,
    BenchInputError,
    BenchQuery,
    group_candidates,
    read_bench_queries,
    read_candidates,
)


# -- reward names ------------------------------------------------------------------------------------------------
def test_reward_names(tmp_path: Path) -> None:
    assert parse_reward("similarity")[1].weights == {"rank": 0.0, "similarity": 1.0, "format": 0.0}
    _, config = parse_reward("relative-soft-loglinear:temperature=0.02")
    assert (config.relative, config.rank_mode, config.shape, config.temperature) == (True, "soft", "loglinear", 0.02)
    assert not config.alarms.enabled  # fixed candidates are no training stream
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("shape: reciprocal\nrank_mode: margin\n")
    assert parse_reward(str(yaml))[0] == "mine"
    assert parse_reward(f"other={yaml}")[0] == "other"
    with pytest.raises(ValueError, match="unknown reward 'cosine'"):
        parse_reward("cosine")
    with pytest.raises(ValueError, match="recall@k shape is a step"):
        parse_reward("margin-recall@10")


# -- inputs ------------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("row", "problem"), [
    ({"query_id": "q", "query": "x", "target_ids": [], "candidates": ["a", "b"]}, "target_ids is empty"),
    ({"query_id": "q", "query": "x", "targets": ["c1"]}, "unknown key"),
    ({"query_id": "q", "target_ids": ["c1"]}, "needs query_id, query and target_ids"),
    ({"query_id": "q", "query": " ", "target_ids": ["c1"]}, "query must be a non-empty string"),
    ({"query_id": "q", "query": "x", "target_ids": ["c1"], "candidates": [{"text": "a"}]}, "candidates\\[0\\]"),
])
def test_bad_queries_are_named_with_their_line(tmp_path: Path, row: dict, problem: str) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"query_id": "ok", "query": "x", "target_ids": "c0"}, row])
    with pytest.raises(BenchInputError, match=f"q.jsonl:2: .*{problem}"):
        read_bench_queries(path)


def test_candidates_must_name_known_queries_and_be_two_per_query(tmp_path: Path) -> None:
    queries, inline = read_bench_queries(write_jsonl(tmp_path / "q.jsonl", [
        {"query_id": "q1", "query": "x", "target_ids": ["c1"], "candidates": ["a", {"rewrite": "b", "kind": "k"}]},
        {"query_id": "q2", "query": "y", "target_ids": ["c2"]}]))
    assert [c.kind for c in inline] == ["candidate", "k"]
    by_id = {q.query_id: q for q in queries}
    with pytest.raises(BenchInputError, match="c.jsonl:1: query_id 'q9' is not among the queries"):
        read_candidates(write_jsonl(tmp_path / "c.jsonl", [{"query_id": "q9", "rewrite": "z"}]), by_id)
    with pytest.raises(BenchInputError, match="fewer than 2 candidates .*'q2'"):
        group_candidates(queries, inline)
    extra = read_candidates(write_jsonl(tmp_path / "c.jsonl", [{"query_id": "q2", "rewrite": r} for r in "zw"]), by_id)
    assert [len(v) for v in group_candidates(queries, inline + extra).values()] == [2, 2]


# -- statistics against brute force ----------------------------------------------------------------------------
@pytest.mark.parametrize(("above", "tied"), [(0, 0), (0, 3), (2, 1), (5, 7), (12, 0)])
def test_expected_metrics_equal_the_mean_over_every_tie_break(above: int, tied: int) -> None:
    positions = [above + 1 + j for j in range(tied + 1)]  # each equally likely
    for k in (1, 5, 10):
        want = np.mean([p <= k for p in positions])
        assert expected_recall_at_k(np.array([above]), np.array([tied]), k)[0] == pytest.approx(want)
    assert expected_reciprocal_rank(np.array([above]), np.array([tied]))[0] == pytest.approx(
        np.mean([1 / p for p in positions]))


def test_best_of_n_pair_counts_and_correlations_by_enumeration() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 8))
        r = rng.integers(0, 3, n).astype(float)  # many ties
        u = rng.integers(0, 3, n).astype(float)
        top = [j for j in range(n) if r[j] == r.max()]
        assert best_of_n(r, u) == pytest.approx(np.mean([u[j] for j in top]))
        same = other = tied = 0
        for i, j in itertools.combinations(range(n), 2):
            if u[i] == u[j]:
                continue
            if r[i] == r[j]:
                tied += 1
            elif (r[i] > r[j]) == (u[i] > u[j]):
                same += 1
            else:
                other += 1
        assert pair_counts(r, u) == (same, other, tied)
        tau = kendall_tau_b(r, u)
        if len(set(r)) > 1 and len(set(u)) > 1:
            every = list(itertools.combinations(range(n), 2))
            concordant = sum(np.sign(r[i] - r[j]) * np.sign(u[i] - u[j]) for i, j in every)
            pairs = n * (n - 1) / 2
            tx = sum(r[i] == r[j] for i, j in every)
            ty = sum(u[i] == u[j] for i, j in every)
            assert tau == pytest.approx(concordant / math.sqrt((pairs - tx) * (pairs - ty)))
            assert pearson(r, u) == pytest.approx(np.corrcoef(r, u)[0, 1])
        else:
            assert tau is None


def test_resample_weights_draw_whole_groups_then_rows() -> None:
    groups = ["a"] * 3 + ["b"] * 5
    w = bootstrap.resample_weights(8, groups, resamples=300, seed=1)
    assert np.all(w.sum(1) >= 6) and np.all(w.sum(1) <= 10)  # two groups drawn, each resampled to its own size
    per_group = np.stack([w[:, :3].sum(1), w[:, 3:].sum(1)], 1)
    assert set(np.unique(per_group)) <= {0.0, 3.0, 5.0, 6.0, 10.0}  # a group is drawn 0, 1 or 2 times, whole
    with pytest.raises(ValueError, match="two groups"):
        bootstrap.resample_weights(3, ["a"] * 3)


def test_interval_widens_when_seeds_disagree() -> None:
    values = np.r_[np.ones(100), np.zeros(100)]  # seed a: all hits, seed b: none
    groups = ["a"] * 100 + ["b"] * 100
    lo_q, hi_q = bootstrap.bootstrap_interval(values)
    lo_g, hi_g = bootstrap.bootstrap_interval(values, groups=groups)
    assert hi_q - lo_q < 0.2 and hi_g - lo_g > 0.9


# -- a run end to end ------------------------------------------------------------------------------------------
CAPTIONS = {f"c{i}": text for i, text in enumerate([
    "a brown dog catches a frisbee in a park", "a black dog catches a frisbee on a beach",
    "a brown dog chases a red ball in a park", "a cat sleeps on a sofa", "two children build a sandcastle",
    "a man rides a bicycle in the city", "a woman reads a book under a tree", "a red bus passes a clock tower"])}


@pytest.fixture(scope="module")
def caption_index(tmp_path_factory: pytest.TempPathFactory, minilm) -> Path:
    from grape_rewards.corpus import CorpusSource, build_index

    folder = tmp_path_factory.mktemp("rb") / "index"
    build_index(CorpusSource.from_records(CAPTIONS.items(), "text"), minilm, folder, progress=False)
    return folder


def bench_inputs() -> tuple[list[BenchQuery], list[BenchCandidate]]:
    queries = [BenchQuery("q0", "brown dog frisbee park", ("c0",), group="s0"),
               BenchQuery("q1", "dog with a ball", ("c2",), group="s0"),
               BenchQuery("q2", "kid sandcastle", ("c4",), group="s1"),
               BenchQuery("q3", "bus tower", ("c7",), group="s1")]
    texts = {"q0": ["a brown dog catches a frisbee in a park", "dog frisbee beach", "a dog"],
             "q1": ["a brown dog chases a red ball", "a dog catches a frisbee", "ball"],
             "q2": ["two children build a sandcastle", "children on a beach", "a cat"],
             "q3": ["a red bus passes a clock tower", "a bus", "a tower in the city"]}
    return queries, [BenchCandidate(q, t, "sampled") for q, ts in texts.items() for t in ts]


def test_run_reward_bench_picks_recompute_from_the_written_rows(caption_index: Path, tmp_path: Path) -> None:
    from grape_rewards.eval.reward_bench_report import write_reward_bench

    queries, candidates = bench_inputs()
    by_id = {q.query_id: q for q in queries}
    rewards = dict(parse_reward(r) for r in ("similarity", "log", "margin-loglinear"))
    values, info = score_candidates(caption_index, rewards, by_id, candidates, device="cpu", progress=False)
    assert info["items"] == len(CAPTIONS)
    truth = LabelJudge("truth", {(c.query_id, c.rewrite): c.rewrite.startswith(("a brown", "two", "a red bus"))
                                 for c in candidates})
    result = run_reward_bench(queries, candidates, values, [truth, BM25Judge("bm25", CAPTIONS, list(CAPTIONS))],
                              resamples=200, progress=False)
    files = write_reward_bench(result, tmp_path / "out", plot_png=False)
    summary = json.loads(Path(files["json"]).read_text())
    scored = [json.loads(line) for line in Path(files["scored"]).read_text().splitlines()]
    picks = [json.loads(line) for line in Path(files["picks"]).read_text().splitlines()]
    for reward in rewards:
        for judge in ("truth", "bm25"):
            hits = []
            for row in (p for p in picks if p["reward"] == reward):
                j = [scored[i]["judges"][judge] for i in row["picked"]]
                hits.append(np.mean(expected_recall_at_k(np.array([x["above"] for x in j]),
                                                         np.array([x["tied"] for x in j]), 1)))
            got = summary["pools"]["all"]["judges"][judge]["rewards"][reward]["R@1"]["value"]
            assert got == pytest.approx(np.mean(hits))
    assert summary["hierarchical"] and summary["groups"] == ["s0", "s1"]
    assert "vs_baseline" in summary["pools"]["all"]["judges"]["truth"]["rewards"]["log"]["R@1"]


def test_a_judge_over_other_ids_and_a_query_naming_an_unknown_id_are_refused(caption_index: Path) -> None:
    queries, candidates = bench_inputs()
    with pytest.raises(BenchInputError, match="does not cover the training corpus: 1 id\\(s\\) missing"):
        BM25Judge("bm25", {k: v for k, v in CAPTIONS.items() if k != "c3"}, list(CAPTIONS))
    bad = [*queries[:3], BenchQuery("q3", "bus tower", ("c99",))]
    with pytest.raises(BenchInputError, match="query 'q3' names target 'c99'"):
        score_candidates(caption_index, dict([parse_reward("log")]), {q.query_id: q for q in bad}, candidates,
                         device="cpu", progress=False)


def test_label_judge_needs_a_label_for_every_candidate() -> None:
    queries, candidates = bench_inputs()
    judge = LabelJudge("truth", {("q0", "a dog"): True})
    with pytest.raises(BenchInputError, match="no label for query 'q0'"):
        judge.judge(candidates, {q.query_id: q for q in queries})
    assert judge_metrics(Judgement(np.array([0]), np.array([0])), ["R@1"])["R@1"].tolist() == [1.0]


@pytest.mark.slow
def test_cli_reward_bench_on_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reward-bench", "--demo", "--out", str(tmp_path / "demo"), "--quiet", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "Judge `bm25`" in out and "`margin-loglinear`" in out
    for name in ("reward-bench.json", "reward-bench.md", "reward-bench.png", "picks.jsonl", "scored.jsonl"):
        assert (tmp_path / "demo" / name).is_file()


@pytest.mark.parametrize(("args", "problem"), [
    (["--judge", "bm25", "--sample", "1", "--model", "x"], "--sample 1: a reward can only pick among two or more"),
    (["--judge", "bm25", "--reward", "cosine"], "unknown reward 'cosine'"),
    (["--judge", "other=bm25", "--judge", "other=bm25"], "two judges are named 'other'"),
    ([], "no judge: add --judge bm25"),
])
def test_cli_reward_bench_bad_input_is_one_line(caption_index: Path, tmp_path: Path, args: list[str], problem: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    queries, candidates = bench_inputs()
    qfile = write_jsonl(tmp_path / "q.jsonl", [{"query_id": q.query_id, "query": q.query,
                                                "target_ids": list(q.target_ids)} for q in queries])
    cfile = write_jsonl(tmp_path / "c.jsonl", [{"query_id": c.query_id, "rewrite": c.rewrite} for c in candidates])
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": k, "text": v} for k, v in CAPTIONS.items()])
    base = ["reward-bench", "--index", str(caption_index), "--queries", str(qfile), "--candidates", str(cfile),
            "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_bm25_reads_the_texts_the_index_keeps(caption_index: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    queries, candidates = bench_inputs()
    qfile = write_jsonl(tmp_path / "q.jsonl", [{"query_id": q.query_id, "query": q.query,
                                                "target_ids": list(q.target_ids), "group": q.group} for q in queries])
    cfile = write_jsonl(tmp_path / "c.jsonl", [{"query_id": c.query_id, "rewrite": c.rewrite} for c in candidates])
    assert main(["reward-bench", "--index", str(caption_index), "--queries", str(qfile), "--candidates", str(cfile),
                 "--judge", "bm25", "--reward", "log", "--out", str(tmp_path / "out"), "--quiet", "--no-plot",
                 "--resamples", "100"]) == 0
    summary = json.loads((tmp_path / "out" / "reward-bench.json").read_text())
    assert set(summary["pools"]["all"]["judges"]["bm25"]["rewards"]) == {"similarity", "log"}  # the baseline joins
    assert summary["inputs"]["candidates"] == len(candidates)
