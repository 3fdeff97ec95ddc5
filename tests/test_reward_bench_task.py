"""The reward benchmark's task (benchmarks/reward_bench_task.py): its ground truth and references, and the quick run
of benchmarks/reward_bench.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import miniature_task as task  # noqa: E402
import reward_bench  # noqa: E402
import reward_bench_task as rbt  # noqa: E402


@pytest.fixture(scope="module")
def seed0() -> tuple[list[task.Scene], list[rbt.TaskQuery], dict[int, list[task.Scene]]]:
    corpus = task.build_corpus(seed=0, clusters=60)
    return corpus, rbt.build_queries(corpus, seed=0, heldout_clusters=10, dev_clusters=5), rbt.corpus_by_cluster(corpus)


def test_every_caption_is_correct_for_itself_only(seed0) -> None:
    corpus, _, clusters = seed0
    for scene in corpus:
        for other in clusters[scene.cluster]:
            assert rbt.correct(scene, clusters[scene.cluster], other.caption) == (other is scene)


def test_queries_hold_every_attribute_and_the_ground_truth_sees_what_hides_it(seed0) -> None:
    _, queries, clusters = seed0
    by_kind: dict[str, list[bool]] = {}
    for q in queries:
        by_kind.setdefault(q.kind, []).append(rbt.correct(q.target, clusters[q.target.cluster], q.text))
    assert set(by_kind) == set(rbt.QUERY_KINDS)
    assert all(by_kind["chatter"]) and all(by_kind["synonyms"])  # all there, in a form the retriever handles badly
    assert not any(by_kind["negated"])  # names hard-negative values (negated)
    assert np.mean(by_kind["typos"]) < 0.2  # misspelt words name nothing
    for q in queries:  # kinds balanced per cluster: every kind in every cluster
        assert {p.kind for p in queries if p.target.cluster == q.target.cluster} == set(rbt.QUERY_KINDS)


def test_no_chatter_sentence_names_an_attribute() -> None:
    for sentence in rbt.CHATTER:
        text = rbt.normalise(sentence)
        for slot in rbt.SLOTS:
            for value in task.VALUES[slot]:
                assert not rbt.names_value(text, slot, value, "dog"), (sentence, slot, value)


def test_rule_rewrite_drops_negations_and_fixes_spelling(seed0) -> None:
    _, queries, clusters = seed0
    fixed = [rbt.correct(q.target, clusters[q.target.cluster], rbt.rule_rewrite(q.text)) for q in queries
             if q.kind == "negated"]
    assert all(fixed)
    typos = [q for q in queries if q.kind == "typos"]
    before = np.mean([rbt.correct(q.target, clusters[q.target.cluster], q.text) for q in typos])
    after = np.mean([rbt.correct(q.target, clusters[q.target.cluster], rbt.rule_rewrite(q.text)) for q in typos])
    assert after > before + 0.3


def test_counts_are_read_from_articles_numbers_and_synonyms() -> None:
    text = rbt.normalise("A pair of pups dashing with a crimson parasol at the seaside")
    assert rbt.names_value(text, "count", "two", "dog")
    assert not rbt.names_value(text, "count", "one", "dog") and not rbt.names_value(text, "count", "three", "dog")
    assert rbt.names_value(rbt.normalise("a sheep resting"), "count", "one", "sheep")
    assert not rbt.names_value(rbt.normalise("three sheep resting"), "count", "one", "sheep")


@pytest.mark.slow
def test_quick_run_writes_every_output_and_its_picks_recompute(tmp_path: Path) -> None:
    out = tmp_path / "rb"
    env = {**os.environ, "GRAPE_BENCH_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(BENCHMARKS / "reward_bench.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "reward-bench.json").read_text())
    for name in ("reward-bench.md", "reward-bench.png", "reward-bench-dev.json", "reward-bench/candidates.jsonl",
                 "reward-bench/picks.jsonl", "reward-bench/scored.jsonl"):
        assert (out / name).is_file(), name
    assert set(record["validation"]["judges"]) == {"truth", "bm25", "minilm"}
    assert record["decision"]["default"] in ("log", *record["design"]["eligible"])
    said = reward_bench.conclusion(record)  # what the demo prints after the recorded run, from the same record
    assert f"the default is {record['decision']['default']} (" in said and "12 held-out queries over 2" in said
    # One reward's primary figure, recomputed from the written picks and judgements.
    scored = [json.loads(line) for line in (out / "reward-bench" / "scored.jsonl").read_text().splitlines()]
    picks = [json.loads(line) for line in (out / "reward-bench" / "picks.jsonl").read_text().splitlines()]
    mine = [p for p in picks if p["pool"] == "sampled" and p["reward"] == "margin-loglinear"]
    assert len(mine) == 12  # 2 seeds x 6 held-out queries
    hits = [np.mean([scored[i]["judges"]["truth"]["above"] == 0 for i in p["picked"]]) for p in mine]
    want = record["summary"]["pools"]["sampled"]["judges"]["truth"]["rewards"]["margin-loglinear"]["R@1"]["value"]
    assert want == pytest.approx(np.mean(hits))
    assert all(scored[i]["kind"] == "sampled" for p in mine for i in p["picked"])
    # relative-log orders every group as log does: the same picks.
    log = {p["query_id"]: p["picked"] for p in picks if p["pool"] == "sampled" and p["reward"] == "log"}
    assert all(log[p["query_id"]] == p["picked"] for p in picks if p["pool"] == "sampled"
               and p["reward"] == "relative-log")
