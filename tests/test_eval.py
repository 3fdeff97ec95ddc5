"""``grape-rewards eval`` end to end on the tiny random open_clip model over fixtures written in the releases'
own layouts (Flickr30k-CN, CIRR val and test1), checked against brute-force ranks computed here; plus the
inflation report and the helpers."""

from __future__ import annotations

import base64
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import draw_images

from grape_rewards.cli import main
from grape_rewards.corpus import CorpusIndex
from grape_rewards.datasets import Query
from grape_rewards.eval.evaluate import RewriteSet, method_texts, parse_named_path
from grape_rewards.eval.inflation_report import (
    FIELDS,
    SimilarityDistribution,
    from_scored_jsonl,
    summarize,
    write_inflation_report,
)
from grape_rewards.retrievers import OpenCLIPRetriever, Retriever, TextInfo

# ------------------------------------------------------------------------------------------------ fixtures


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


FLICKR_TEXTS = ["一只狗在草地上奔跑", "两个人在海边散步", "一辆红色的汽车停在街上", "孩子们在公园里玩耍",
                "一只猫睡在沙发上", "厨房里有一个女人在做饭", "一群鸟在天空中飞翔", "一个男人骑着自行车",
                "雪山下的湖泊"]


def write_flickr_release(root: Path, n_images: int = 12) -> list[Path]:
    """Flickr30k-CN in the Chinese-CLIP layout: test_imgs.tsv (id, base64 image) + test_texts.jsonl.

    Query 1..9 target images 1000..; query 2 has two targets; query 10 has no target (skipped)."""
    drawn = draw_images(root / "drawn", n=n_images, seed=3)
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{1000 + i}\t{base64.b64encode(p.read_bytes()).decode()}" for i, p in enumerate(drawn)]
    (root / "test_imgs.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    rows = [{"text_id": i + 1, "text": t, "image_ids": [1000 + i]} for i, t in enumerate(FLICKR_TEXTS)]
    rows[1]["image_ids"] = [1001, 1011]
    rows.append({"text_id": 10, "text": "没有配对的图片", "image_ids": []})
    write_jsonl(root / "test_texts.jsonl", rows)
    return drawn


CIRR_N = 60  # the server takes the top 50: the gallery needs at least 51 images


def cirr_name(split: str, i: int) -> str:
    return f"{'dev' if split == 'val' else split}-{i}-0-img{i % 2}"


def write_cirr_release(root: Path, split: str = "val", n_queries: int = 6) -> list[dict]:
    """CIRR in the release layout: captions/cap.rc2.<split>.json, image_splits/split.rc2.<split>.json and
    img_raw/<dev|test1>/*.png, with a gallery of CIRR_N drawn images. Query j: reference 6j, target 6j+1,
    img_set.members = the six images 6j..6j+5 (reference included, as in the release)."""
    folder = "dev" if split == "val" else split
    names = [cirr_name(split, i) for i in range(CIRR_N)]
    drawn = draw_images(root / "drawn", n=CIRR_N, seed=5)
    for name, path in zip(names, drawn):
        (root / "img_raw" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / "img_raw" / folder / f"{name}.png")
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "image_splits" / f"split.rc2.{split}.json").write_text(
        json.dumps({n: f"./{folder}/{n}.png" for n in names}, indent=1))
    captions = ["make the dog smaller", "add a second cat", "change the car to blue", "remove the people",
                "show it at night", "zoom in on the bird", "make it snowy", "turn it upside down"]
    records = []
    for j in range(n_queries):
        members = names[6 * j:6 * j + 6]
        rec: dict = {"pairid": 100 + j, "reference": members[0], "caption": captions[j % len(captions)],
                     "img_set": {"id": j, "members": members, "reference_rank": 0}}
        if split != "test1":
            rec.update(target_hard=members[1], target_soft={members[1]: 1.0})
            rec["img_set"]["target_rank"] = 1
        records.append(rec)
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(records, indent=1))
    return records


def brute_force_ranks(q: np.ndarray, corpus: np.ndarray, targets: list[list[int]],
                      excluded: list[list[int]]) -> list[int]:
    """1 + the number of non-target, non-excluded items scoring strictly above the best target."""
    scores = q.astype(np.float64) @ corpus.astype(np.float64).T
    ranks = []
    for i, row in enumerate(scores):
        best = max(row[t] for t in targets[i])
        skip = set(targets[i]) | set(excluded[i])
        ranks.append(1 + sum(1 for j, s in enumerate(row) if j not in skip and s > best))
    return ranks


def recall(ranks: list[int], k: int) -> float:
    return 100.0 * float(np.mean(np.asarray(ranks) <= k))


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def retriever_spec(open_clip_dir: Path) -> str:
    return f"open_clip:local-dir:{open_clip_dir}"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> int:
    return main([str(a) for a in args])


# ----------------------------------------------------------------------------------------------- Flickr30k-CN


@pytest.mark.slow
def test_eval_flickr_end_to_end(tmp_path: Path, retriever_spec: str, tiny_open_clip: OpenCLIPRetriever,
                                capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "flickr"
    write_flickr_release(root)
    rewrites = {"1": "a dog running on grass", "2": "two people walking on the beach", "3": "",
                "4": "children playing in a park", "5": "a cat asleep on a sofa", "6": "a woman cooking",
                "7": "birds flying in the sky", "8": "a man riding a bicycle"}  # 9 missing, 3 empty
    write_jsonl(tmp_path / "rw.jsonl", [{"query_id": k, "rewrite": v, "raw": f"<answer>{v}</answer>", "model": "m"}
                                        for k, v in rewrites.items()])
    out, idx = tmp_path / "out", tmp_path / "idx"
    rc = run_cli(["eval", "--benchmark", "flickr30k-cn", "--root", root, "--retriever", retriever_spec,
                  "--device", "cpu", "--rewrites", f"grape={tmp_path / 'rw.jsonl'}", "--save-index", idx,
                  "--per-query", "--out", out, "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| grape |" in printed and "| original |" in printed

    result = json.loads((out / "metrics.json").read_text())
    assert result["benchmark"]["num_queries"] == 10 and result["benchmark"]["num_evaluated"] == 9
    assert result["benchmark"]["skipped_no_target"] == 1
    assert result["protocol"] == "recall" and result["index"]["count"] == 12
    grape = result["methods"]["grape"]
    assert grape["fallback"] == {"missing": 1, "empty": 1, "total": 2}
    assert result["methods"]["original"]["fallback"]["total"] == 0

    # Brute force over the saved index's (float16) embeddings and freshly encoded queries.
    index = CorpusIndex.load(idx)
    corpus = index.embeddings.float().numpy()
    ids = index.ids
    assert ids == [str(1000 + i) for i in range(12)]
    targets = [[ids.index(str(1000 + i))] for i in range(9)]
    targets[1] = [ids.index("1001"), ids.index("1011")]
    texts = {"original": FLICKR_TEXTS,
             "grape": [rewrites.get(str(i + 1)) or FLICKR_TEXTS[i] for i in range(9)]}
    for method, method_texts_ in texts.items():
        q = tiny_open_clip.encode_texts(method_texts_).numpy()
        ranks = brute_force_ranks(q, corpus, targets, [[] for _ in targets])
        metrics = result["methods"][method]["metrics"]
        for k in (1, 5, 10):
            assert metrics[f"R@{k}"] == pytest.approx(recall(ranks, k)), (method, k)
        assert metrics["mean"] == pytest.approx(np.mean([recall(ranks, k) for k in (1, 5, 10)]))
        # The inflation numbers are the same rows' similarities.
        sims = q.astype(np.float64) @ corpus.T.astype(np.float64)
        target_sim = np.array([max(sims[i, t] for t in targets[i]) for i in range(9)])
        infl = result["inflation"][method]
        assert infl["target_sim"]["mean"] == pytest.approx(target_sim.mean(), abs=1e-5)
        assert infl["target_sim"]["median"] == pytest.approx(np.median(target_sim), abs=1e-5)
        per_query = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
        assert [r["rank"] for r in per_query if r["method"] == method] == ranks

    md = (out / "metrics.md").read_text()
    assert "| method | R@1 | R@5 | R@10 | mean | Δmean | fallback |" in md
    assert "2 (1 missing, 1 empty)" in md
    inflation = json.loads((out / "inflation.json").read_text())
    assert set(inflation["methods"]) == {"original", "grape"}
    assert set(FIELDS) <= set(inflation["methods"]["grape"])
    assert "| original |" in (out / "inflation.md").read_text()
    with Image.open(out / "inflation.png") as im:
        assert im.format == "PNG" and im.size[0] > 400

    # The saved index is reused by a second run (same corpus, same retriever), and --index loads it.
    rc = run_cli(["eval", "--benchmark", "flickr30k-cn", "--root", root, "--device", "cpu", "--index", idx,
                  "--out", tmp_path / "out2", "--no-plot", "--quiet"])
    assert rc == 0
    again = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert again["methods"]["original"]["metrics"] == result["methods"]["original"]["metrics"]
    assert not (tmp_path / "out2" / "inflation.png").exists()


@pytest.mark.slow
def test_eval_refuses_an_index_of_another_retriever(tmp_path: Path, retriever_spec: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "flickr"
    write_flickr_release(root)
    idx = tmp_path / "idx"
    assert run_cli(["index", "build", "--retriever", retriever_spec, "--device", "cpu", "--quiet",
                    "--source", write_jsonl(tmp_path / "src.jsonl", [{"id": "1000", "image": str(root / "drawn" /
                                                                                                 "img_000.png")}]),
                    "--out", idx]) == 0
    manifest = json.loads((idx / "manifest.json").read_text())
    manifest["retriever"]["fingerprint"] = "another-model"
    (idx / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    rc = run_cli(["eval", "--benchmark", "flickr30k-cn", "--root", root, "--retriever", retriever_spec,
                  "--device", "cpu", "--index", idx, "--out", tmp_path / "out", "--quiet"])
    assert rc == 2
    assert "fingerprint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- ensembles


def build_image_index(retriever_spec: str, images: Sequence[tuple[str, Path]], folder: Path) -> Path:
    """``grape-rewards index build`` of (id, image path) records, listed in the order given."""
    source = write_jsonl(folder.with_suffix(".jsonl"), [{"id": i, "image": str(p)} for i, p in images])
    assert run_cli(["index", "build", "--retriever", retriever_spec, "--device", "cpu", "--quiet", "--source",
                    source, "--out", folder]) == 0
    return folder


def combined(per_member: Sequence[Sequence[int]], k: int, rule: str) -> float:
    """The ensemble's R@K computed here: per query, the mean or min of the retrievers' hits (rank <= k)."""
    hits = np.asarray(per_member) <= k  # (retrievers, queries)
    return 100.0 * float((hits.mean(axis=0) if rule == "mean" else hits.min(axis=0)).mean())


@pytest.mark.slow
def test_eval_ensemble_per_retriever_and_combined(tmp_path: Path, retriever_spec: str, hf_clip_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Two tiny random-init retrievers (open_clip and transformers CLIP), their indexes listing the same ids in
    opposite orders: each retriever's figures are its single-index eval's, the combined R@K is the mean / min of
    the per-query hits, and metrics.json keeps its single-index keys."""
    root = tmp_path / "flickr"
    drawn = write_flickr_release(root)
    ids = [str(1000 + i) for i in range(len(drawn))]
    rewrites = {"1": "a dog running on grass", "2": "", "4": "children playing in a park", "6": "a woman cooking"}
    rw = write_jsonl(tmp_path / "rw.jsonl", [{"query_id": k, "rewrite": v, "raw": v, "model": "m"}
                                             for k, v in rewrites.items()])
    common = ["--benchmark", "flickr30k-cn", "--root", root, "--device", "cpu", "--rewrites", f"grape={rw}",
              "--per-query", "--quiet"]
    # Member 0: the tiny open_clip, indexed by eval in the benchmark's order (its single-index figures too).
    idx_a = tmp_path / "idx_a"
    assert run_cli(["eval", *common, "--retriever", retriever_spec, "--save-index", idx_a, "--no-plot",
                    "--out", tmp_path / "single_0"]) == 0
    # Member 1: the tiny transformers CLIP, indexed in reverse order (and, to compare, in the benchmark's order).
    hf_spec = f"hf:{hf_clip_dir}"
    idx_b = build_image_index(hf_spec, list(zip(ids, drawn))[::-1], tmp_path / "idx_b")
    idx_b_fwd = build_image_index(hf_spec, list(zip(ids, drawn)), tmp_path / "idx_b_fwd")
    assert CorpusIndex.load(idx_a).ids == ids and CorpusIndex.load(idx_b).ids == ids[::-1]
    b = []
    for j, idx in enumerate((idx_b, idx_b_fwd)):
        assert run_cli(["eval", *common, "--index", idx, "--no-plot", "--out", tmp_path / f"single_1_{j}"]) == 0
        b.append(json.loads((tmp_path / f"single_1_{j}" / "metrics.json").read_text()))
    assert b[0]["methods"] == b[1]["methods"]  # the order of an index's ids changes nothing
    singles = [json.loads((tmp_path / "single_0" / "metrics.json").read_text()), b[0]]
    capsys.readouterr()

    results = {}
    for rule in ("mean", "min"):
        out = tmp_path / f"ensemble_{rule}"
        argv = ["eval", *common, "--index", idx_a, "--index", idx_b, "--out", out]
        assert run_cli([*argv, "--ensemble", rule] if rule == "min" else argv) == 0  # mean: the default
        printed = capsys.readouterr().out
        result = results[rule] = json.loads((out / "metrics.json").read_text())
        single_keys = {"benchmark", "retriever", "index", "protocol", "labelled", "headline", "methods", "files",
                       "inflation"}
        assert set(result) == single_keys | {"ensemble"} and set(singles[0]) == single_keys
        assert result["retriever"] == singles[0]["retriever"] and result["index"] == singles[0]["index"]
        ensemble = result["ensemble"]
        assert ensemble["rule"] == rule
        assert ensemble["combined"].startswith("ensemble R@K = the " + ("mean over" if rule == "mean" else "share"))
        assert [m["retriever"]["spec"] for m in ensemble["members"]] == [retriever_spec, hf_spec]
        assert [m["index"]["path"] for m in ensemble["members"]] == [str(idx_a), str(idx_b)]
        for member, single in zip(ensemble["members"], singles):
            assert member["methods"] == {name: {"metrics": m["metrics"]} for name, m in single["methods"].items()}
        per_query = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
        for name in ("original", "grape"):
            rows = [r for r in per_query if r["method"] == name]
            assert len(rows) == 9 and all(r["rank"] == r["retriever_0_rank"] for r in rows)
            ranks = [[r[f"retriever_{j}_rank"] for r in rows] for j in range(2)]
            for j, single_dir in enumerate(["single_0", "single_1_0"]):
                single_rows = (tmp_path / single_dir / "per_query.jsonl").read_text().splitlines()
                assert ranks[j] == [json.loads(line)["rank"] for line in single_rows
                                    if json.loads(line)["method"] == name]
            metrics = result["methods"][name]["metrics"]
            for k in (1, 5, 10):
                assert metrics[f"R@{k}"] == pytest.approx(combined(ranks, k, rule)), (rule, name, k)
            assert metrics["mean"] == pytest.approx(np.mean([metrics[f"R@{k}"] for k in (1, 5, 10)]))
            if rule == "mean":  # the mean rule: the mean of the retrievers' R@K
                assert metrics["R@5"] == pytest.approx(np.mean([s["methods"][name]["metrics"]["R@5"]
                                                                for s in singles]))
        assert result["methods"]["grape"]["fallback"] == {"missing": 5, "empty": 1, "total": 6}
        assert set(result["inflation"]) == {f"{m} [retriever {j}]" for m in ("original", "grape") for j in (0, 1)}
        assert result["inflation"]["grape [retriever 1]"] == singles[1]["inflation"]["grape"]
        md = (out / "metrics.md").read_text()
        assert md in printed and f"## Ensemble ({rule})" in md and f"## Retriever 1: `{hf_spec}`" in md
        assert md.count("| method | R@1 | R@5 | R@10 | mean | Δmean | fallback |") == 3
    mean, low = (results[r]["methods"]["original"]["metrics"] for r in ("mean", "min"))
    assert all(low[k] <= mean[k] for k in mean)


@pytest.mark.slow
def test_eval_ensemble_cirr_val(tmp_path: Path, retriever_spec: str, hf_clip_dir: Path) -> None:
    """CIRR with an ensemble: each (composed) retriever over its own index; R@K and R_subset@K combined per query
    from the retrievers' ranks, avg from the combined figures."""
    root = tmp_path / "cirr"
    write_cirr_release(root, "val")
    common = ["--benchmark", "cirr", "--root", root, "--split", "val", "--device", "cpu", "--per-query", "--no-plot",
              "--quiet"]
    singles, indexes = [], []
    for j, spec in enumerate((retriever_spec, f"hf:{hf_clip_dir}")):
        indexes.append(tmp_path / f"idx_{j}")
        assert run_cli(["eval", *common, "--retriever", spec, "--save-index", indexes[-1],
                        "--out", tmp_path / f"single_{j}"]) == 0
        singles.append(json.loads((tmp_path / f"single_{j}" / "metrics.json").read_text()))
    out = tmp_path / "ensemble"
    assert run_cli(["eval", *common, "--index", indexes[0], "--index", indexes[1], "--ensemble", "min",
                    "--out", out]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [m["methods"]["original"]["metrics"] for m in result["ensemble"]["members"]] == \
        [s["methods"]["original"]["metrics"] for s in singles]
    assert all(m["retriever"]["type"] == "ComposedRetriever" for m in result["ensemble"]["members"])
    rows = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    ranks = [[r[f"retriever_{j}_rank"] for r in rows] for j in range(2)]
    subset = [[r[f"retriever_{j}_subset_rank"] for r in rows] for j in range(2)]
    metrics = result["methods"]["original"]["metrics"]
    for k in (1, 5, 10, 50):
        assert metrics[f"R@{k}"] == pytest.approx(combined(ranks, k, "min"))
    for k in (1, 2, 3):
        assert metrics[f"R_subset@{k}"] == pytest.approx(combined(subset, k, "min"))
    assert metrics["avg"] == pytest.approx((metrics["R@5"] + metrics["R_subset@1"]) / 2)
    assert "R_subset@K alike" in (out / "metrics.md").read_text()


@pytest.mark.slow
def test_eval_ensemble_refuses_bad_input(tmp_path: Path, retriever_spec: str, hf_clip_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Indexes of different ids (named, with an example id), a shared --retriever, CIRR submissions."""
    root = tmp_path / "flickr"
    drawn = write_flickr_release(root)
    records = [(str(1000 + i), p) for i, p in enumerate(drawn)]
    idx_a = build_image_index(retriever_spec, records, tmp_path / "idx_a")
    fewer = build_image_index(f"hf:{hf_clip_dir}", records[:-1], tmp_path / "fewer")
    base = ["eval", "--benchmark", "flickr30k-cn", "--root", root, "--device", "cpu", "--quiet"]
    capsys.readouterr()
    assert run_cli([*base, "--index", idx_a, "--index", fewer, "--out", tmp_path / "out"]) == 2
    assert (f"index {fewer} does not hold the same ids as {idx_a}: '1011' is in {idx_a} only (1 ids missing, "
            "0 extra)") in capsys.readouterr().err
    assert run_cli([*base, "--index", idx_a, "--index", fewer, "--retriever", retriever_spec,
                    "--out", tmp_path / "out"]) == 2
    assert "drop --retriever" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    cirr = tmp_path / "cirr"
    write_cirr_release(cirr, "test1", n_queries=1)
    write_cirr_release(cirr, "val", n_queries=1)
    missing = [tmp_path / "no-index-a", tmp_path / "no-index-b"]  # refused before any index is read
    for split, flags in (("test", []), ("val", ["--write-submissions"])):
        assert run_cli(["eval", "--benchmark", "cirr", "--root", cirr, "--split", split, "--index", missing[0],
                        "--index", missing[1], *flags, "--out", tmp_path / "cirr_out", "--quiet"]) == 2
        assert "an ensemble of indexes has no single ranking" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ CIRR


def cirr_expected(records: list[dict], root: Path, split: str, texts: list[str], retriever: OpenCLIPRetriever,
                  image_weight: float = 0.5) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(fused queries, float16-rounded gallery, gallery ids), computed independently of the package's eval."""
    folder = "dev" if split == "val" else split
    ids = [cirr_name(split, i) for i in range(CIRR_N)]
    gallery = retriever.encode_images([root / "img_raw" / folder / f"{n}.png" for n in ids]).half().float().numpy()
    text = retriever.encode_texts(texts).numpy()
    ref = gallery[[ids.index(r["reference"]) for r in records]]
    return normalize((1 - image_weight) * text + image_weight * ref), gallery, ids


@pytest.mark.slow
def test_eval_cirr_val(tmp_path: Path, retriever_spec: str, tiny_open_clip: OpenCLIPRetriever) -> None:
    root = tmp_path / "cirr"
    records = write_cirr_release(root, "val")
    rewrites = {"100": "a small dog on a lawn", "101": "two cats on a bed", "103": "an empty street"}
    write_jsonl(tmp_path / "rw.jsonl", [{"query_id": k, "rewrite": v, "raw": v, "model": "m"}
                                        for k, v in rewrites.items()])
    out = tmp_path / "out"
    rc = run_cli(["eval", "--benchmark", "cirr", "--root", root, "--split", "val", "--retriever", retriever_spec,
                  "--device", "cpu", "--fusion", "sum", "--image-weight", "0.5",
                  "--rewrites", str(tmp_path / "rw.jsonl"),
                  "--write-submissions", "--out", out, "--quiet"])
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["protocol"] == "cirr" and result["retriever"]["fusion"] == "sum"
    assert result["methods"]["rw"]["fallback"]["missing"] == 3

    for method, texts in {"original": [r["caption"] for r in records],
                          "rw": [rewrites.get(str(r["pairid"]), r["caption"]) for r in records]}.items():
        q, gallery, ids = cirr_expected(records, root, "val", texts, tiny_open_clip)
        targets = [[ids.index(r["target_hard"])] for r in records]
        refs = [[ids.index(r["reference"])] for r in records]
        ranks = brute_force_ranks(q, gallery, targets, refs)
        metrics = result["methods"][method]["metrics"]
        for k in (1, 5, 10, 50):
            assert metrics[f"R@{k}"] == pytest.approx(recall(ranks, k)), (method, k)
        # The subset: img_set.members minus the reference.
        sub_ranks = []
        for i, r in enumerate(records):
            subset = [ids.index(m) for m in r["img_set"]["members"] if m != r["reference"]]
            sub_ranks.append(brute_force_ranks(q[i:i + 1], gallery[subset], [[subset.index(targets[i][0])]], [[]])[0])
        for k in (1, 2, 3):
            assert metrics[f"R_subset@{k}"] == pytest.approx(recall(sub_ranks, k)), (method, k)
        assert metrics["avg"] == pytest.approx((metrics["R@5"] + metrics["R_subset@1"]) / 2)
        if method == "original":
            # With half the query made of the reference image, the reference outscores the target: without
            # the exclusion the ranks would be worse.
            unexcluded = brute_force_ranks(q, gallery, targets, [[] for _ in records])
            assert sum(unexcluded) > sum(ranks)
        # Submissions: the top 50 of the gallery minus the reference, and the top 3 of the subset.
        sub = json.loads((out / "submissions" / f"{method}.val_recall.json").read_text())
        sub_subset = json.loads((out / "submissions" / f"{method}.val_recall_subset.json").read_text())
        assert sub["version"] == "rc2" and sub["metric"] == "recall"
        assert sub_subset["metric"] == "recall_subset"
        scores = q.astype(np.float64) @ gallery.T.astype(np.float64)
        for i, r in enumerate(records):
            top = sub[str(r["pairid"])]
            assert len(top) == 50 and r["reference"] not in top and len(set(top)) == 50
            order = [ids[j] for j in np.argsort(-scores[i], kind="stable") if ids[j] != r["reference"]]
            assert top[:5] == order[:5]
            top3 = sub_subset[str(r["pairid"])]
            members = [m for m in r["img_set"]["members"] if m != r["reference"]]
            assert len(top3) == 3 and set(top3) <= set(members)
            assert top3 == sorted(members, key=lambda m: -scores[i, ids.index(m)])[:3]
    md = (out / "metrics.md").read_text()
    assert "R_subset@1" in md and "Δavg" in md
    assert (out / "inflation.png").is_file()


@pytest.mark.slow
def test_eval_cirr_test_split_writes_submissions_only(tmp_path: Path, retriever_spec: str,
                                                      tiny_open_clip: OpenCLIPRetriever) -> None:
    root = tmp_path / "cirr"
    records = write_cirr_release(root, "test1", n_queries=4)
    write_jsonl(tmp_path / "rw.jsonl", [{"query_id": "100", "rewrite": "a dog", "raw": "", "model": "m"}])
    out = tmp_path / "out"
    rc = run_cli(["eval", "--benchmark", "cirr", "--root", root, "--split", "test", "--retriever", retriever_spec,
                  "--device", "cpu", "--rewrites", f"grape={tmp_path / 'rw.jsonl'}", "--out", out, "--quiet"])
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["labelled"] is False and result["methods"]["original"]["metrics"] is None
    assert "inflation" not in result and not (out / "inflation.png").exists()
    assert result["methods"]["grape"]["fallback"]["missing"] == 3
    q, gallery, ids = cirr_expected(records, root, "test1", [r["caption"] for r in records], tiny_open_clip)
    scores = q.astype(np.float64) @ gallery.T.astype(np.float64)
    for method in ("original", "grape"):
        recall_file = out / "submissions" / f"{method}.test1_recall.json"
        subset_file = out / "submissions" / f"{method}.test1_recall_subset.json"
        assert result["methods"][method]["submissions"] == [str(recall_file), str(subset_file)]
        sub, sub_subset = json.loads(recall_file.read_text()), json.loads(subset_file.read_text())
        assert set(sub) == {"version", "metric"} | {str(r["pairid"]) for r in records}
        for i, r in enumerate(records):
            assert len(sub[str(r["pairid"])]) == 50 and r["reference"] not in sub[str(r["pairid"])]
            members = [m for m in r["img_set"]["members"] if m != r["reference"]]
            assert len(sub_subset[str(r["pairid"])]) == 3 and set(sub_subset[str(r["pairid"])]) <= set(members)
            if method == "original":
                order = [ids[j] for j in np.argsort(-scores[i], kind="stable") if ids[j] != r["reference"]]
                assert sub[str(r["pairid"])][:5] == order[:5]
    assert "Labels are hidden" in (out / "metrics.md").read_text()


@pytest.mark.slow
def test_eval_cirr_small_gallery_writes_metrics_and_refuses_only_the_submission(
        tmp_path: Path, retriever_spec: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A gallery under 51 images has no top 50 besides each reference: the metrics are still written, the
    submission is refused with its reason on stderr, and the exit code (1) says that asked-for files are missing."""
    monkeypatch.setattr(sys.modules[__name__], "CIRR_N", 30)
    root = tmp_path / "cirr"
    write_cirr_release(root, "val", n_queries=4)
    out = tmp_path / "out"
    rc = run_cli(["eval", "--benchmark", "cirr", "--root", root, "--split", "val", "--retriever", retriever_spec,
                  "--device", "cpu", "--write-submissions", "--out", out, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1, err
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["methods"]["original"]["metrics"]) >= {"R@1", "R@50", "R_subset@1", "avg"}
    reason = result["methods"]["original"]["submissions_refused"]
    assert "recall needs 50 ranked ids, got 29" in reason and "the index holds 30 items" in reason
    assert reason in err and "the metrics were written" in err
    assert not (out / "submissions").exists() and "submissions" not in result["methods"]["original"]
    assert (out / "metrics.md").is_file()


# --------------------------------------------------------------------------------------- inflation, helpers


def test_inflation_report_from_scored_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)

    def rows(shift: float) -> list[dict]:
        out = []
        for _ in range(20):
            mean = float(rng.normal(0.2 + shift, 0.02))
            out.append({"target_sim": mean + 0.1, "mean_sim": mean, "best_nontarget_sim": mean + 0.15,
                        "num_tokens": 7.0})
        return out

    rank_rows = rows(0.0)
    sim_rows = [*rows(0.3), {"target_sim": 0.0, "mean_sim": 0.0, "best_nontarget_sim": 0.0, "num_tokens": 0.0}]
    write_jsonl(tmp_path / "rank.jsonl", rank_rows)
    write_jsonl(tmp_path / "sim.jsonl", sim_rows)
    rc = run_cli(["inflation-report", "--scored", f"rank-reward={tmp_path / 'rank.jsonl'}",
                  "--scored", f"similarity-reward={tmp_path / 'sim.jsonl'}", "--out", tmp_path / "rep",
                  "--title", "toy"])
    assert rc == 0
    report = json.loads((tmp_path / "rep" / "inflation.json").read_text())["methods"]
    assert report["similarity-reward"]["skipped"] == 1 and report["similarity-reward"]["count"] == 20
    assert report["rank-reward"]["target_sim"]["mean"] == pytest.approx(np.mean([r["target_sim"] for r in rank_rows]))
    assert report["rank-reward"]["margin"]["median"] == pytest.approx(-0.05)
    assert report["similarity-reward"]["target_sim"]["mean"] > report["rank-reward"]["target_sim"]["mean"]
    assert "| similarity-reward | 20 | 1 |" in capsys.readouterr().out
    with Image.open(tmp_path / "rep" / "inflation.png") as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="line 1"):
        write_jsonl(tmp_path / "bad.jsonl", [{"target_sim": 0.1}])
        from_scored_jsonl(tmp_path / "bad.jsonl")


def test_inflation_summary_percentiles() -> None:
    x = np.linspace(0.0, 1.0, 11)
    d = SimilarityDistribution("m", {"target_sim": x, "best_nontarget_sim": x / 2, "mean_sim": np.zeros(11)})
    s = summarize(d)
    assert s["target_sim"] == pytest.approx({"mean": 0.5, "median": 0.5, "p10": 0.1, "p90": 0.9})
    assert s["margin"]["mean"] == pytest.approx(0.25) and s["margin_positive"] == pytest.approx(10 / 11)
    with pytest.raises(ValueError, match="different lengths"):
        SimilarityDistribution("m", {"target_sim": x, "best_nontarget_sim": x[:3], "mean_sim": x})
    with pytest.raises(ValueError, match="unique"):
        write_inflation_report([d, d], "/nonexistent", plot=False)


def test_method_texts_fall_back_to_the_original() -> None:
    queries = [Query(query_id=str(i), text=f"q{i}", target_ids=("a",)) for i in range(4)]
    m = method_texts(queries, RewriteSet("rw", {"0": "r0", "1": "  ", "3": "r3", "99": "x"}))
    assert m.texts == ["r0", "q1", "q2", "r3"]
    assert (m.fallback_missing, m.fallback_empty, m.fallback_ids) == (1, 1, ["1", "2"])
    assert method_texts(queries, None).texts == ["q0", "q1", "q2", "q3"]


def test_parse_named_path(tmp_path: Path) -> None:
    assert parse_named_path("a=b.jsonl") == ("a", Path("b.jsonl"))
    odd = tmp_path / "x=y.jsonl"
    odd.write_text("")
    assert parse_named_path(str(odd)) == (None, odd)


@pytest.mark.slow
def test_eval_rejects_rewrites_of_another_benchmark(tmp_path: Path, retriever_spec: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "flickr"
    write_flickr_release(root, n_images=12)
    write_jsonl(tmp_path / "rw.jsonl", [{"query_id": "cirr-1", "rewrite": "x", "raw": "x", "model": "m"}])
    rc = run_cli(["eval", "--benchmark", "flickr30k-cn", "--root", root, "--retriever", retriever_spec,
                  "--device", "cpu", "--rewrites", tmp_path / "rw.jsonl", "--out", tmp_path / "out", "--quiet"])
    assert rc == 2
    assert "shares no query_id" in capsys.readouterr().err


def test_encode_queries_fuses_the_reference_from_the_index() -> None:
    from grape_rewards.eval.evaluate import encode_queries
    from grape_rewards.retrievers.composed import ComposedRetriever

    class Fixed(Retriever):
        """Every text is the unit vector (1, 0); no model."""

        spec, dim, device, max_text_tokens, corpus_modality = "fixed", 2, torch.device("cpu"), 77, "image"

        @property
        def fingerprint(self) -> str:
            return "fixed"

        def text_info(self, texts: Sequence[str]) -> list[TextInfo]:
            return [TextInfo(1, False) for _ in texts]

        def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0]] * len(texts))

    index = CorpusIndex(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), ["ref", "other"])
    composed = ComposedRetriever(Fixed(), fusion="sum", image_weight=0.5)
    q = encode_queries(composed, index, ["t"], ["ref"], progress=False)
    assert torch.allclose(q, torch.tensor([[0.7071, 0.7071]]), atol=1e-4)
    with pytest.raises(ValueError, match="reference_id"):
        encode_queries(composed, index, ["t"], [None], progress=False)


def test_eval_counts_duplicated_gallery_images_as_ties() -> None:
    """A gallery where 10 images have a bit-identical twin: R@K is the tie rule's (float64 brute force), not the
    last bit of the scan's rounding."""
    from types import SimpleNamespace

    from grape_rewards.eval.evaluate import evaluate

    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(40, 64, generator=gen), dim=1).half()
    gallery[30:] = gallery[:10]  # images 30..39 are copies of images 0..9
    index = CorpusIndex(gallery.float(), [f"img{i}" for i in range(40)])
    queries = torch.nn.functional.normalize(gallery[:29].float() + 0.9 * torch.randn(29, 64, generator=gen), dim=1)
    texts = [f"caption {i}" for i in range(29)]

    class Table(Retriever):
        """Each caption's embedding is a fixed row: no model."""

        spec, dim, device, max_text_tokens, corpus_modality = "table", 64, torch.device("cpu"), 77, "image"

        @property
        def fingerprint(self) -> str:
            return "table"

        def text_info(self, texts: Sequence[str]) -> list[TextInfo]:
            return [TextInfo(1, False) for _ in texts]

        def encode_texts(self, batch: Sequence[str], batch_size: int = 256) -> torch.Tensor:
            return queries[[texts.index(t) for t in batch]]

    bench = SimpleNamespace(name="toy", split="test", root=Path("."), task="multilingual",
                            queries=lambda: [Query(f"q{i}", texts[i], (f"img{i}",)) for i in range(29)])
    report = evaluate(bench, Table(), index, progress=False)
    ranks = brute_force_ranks(queries.numpy(), gallery.float().numpy(), [[i] for i in range(29)], [[]] * 29)
    metrics = report.methods[0].metrics
    for k in (1, 5, 10):
        assert metrics[f"R@{k}"] == pytest.approx(recall(ranks, k)), k
