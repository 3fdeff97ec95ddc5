"""Where the GRPO miniature's time goes on a CPU, and which cuts would keep its recorded figures.

Measured on the miniature's own policy (SmolLM2-135M-Instruct, float32) and held-out prompts:

- **prefill share**: one forward pass over a batch of 48 prompts (last position's logits only, as ``generate``
  does) against greedy generation of 24 tokens for the same batch (the miniature's ``generate``);
- **side by side**: two batches generated one after the other with 2 threads, against the same two batches in two
  concurrent processes of 1 thread each (how two arms could train side by side), and whether the texts match;
- **thread invariance**: the gradient of one training-shaped forward and backward pass (16 sequences) with 1 thread
  and with 2 threads, bitwise. Arms run side by side reproduce the recorded figures only if this holds.

    python benchmarks/bench_miniature_cost.py          # ~3 min on 2 cores; results/miniature-cost-cpu.{json,md}
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_miniature as mini
import miniature_task as task
from common import matmul_peak_flops, write_result

BATCH = 48
NEW_TOKENS = 24


def heldout(count: int) -> list[task.MiniQuery]:
    corpus = task.build_corpus(seed=0)
    return [q for q in task.build_queries(corpus, seed=0) if q.split == "heldout"][:count]


def timed_generate(threads: int, queries: list[task.MiniQuery], start: Any, out: Any) -> None:
    """Worker: load the policy with ``threads`` threads, wait for the others, generate, report texts and times."""
    torch.set_num_threads(threads)
    model, tokenizer = mini.load_policy(mini.policy_folder(None), "cpu")
    start.wait()
    t0 = time.perf_counter()
    texts = mini.generate(model, tokenizer, queries, NEW_TOKENS, batch_size=BATCH)
    out.put((t0, time.perf_counter(), texts))


def side_by_side(batches: list[list[task.MiniQuery]]) -> tuple[float, list[Any]]:
    """Wall time of the batches generated at once, one process of 1 thread each, and their texts in order."""
    ctx = mp.get_context("spawn")
    start, queues = ctx.Barrier(len(batches)), [ctx.Queue() for _ in batches]
    procs = [ctx.Process(target=timed_generate, args=(1, b, start, q)) for b, q in zip(batches, queues)]
    for p in procs:
        p.start()
    results = [q.get() for q in queues]
    for p in procs:
        p.join()
    return max(r[1] for r in results) - min(r[0] for r in results), [r[2] for r in results]


def gradient(model: Any, enc: dict[str, torch.Tensor], threads: int) -> list[torch.Tensor]:
    """The gradient of the mean token log-likelihood of ``enc`` under ``model`` with ``threads`` threads."""
    torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    logits = model(**enc).logits[:, :-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, enc["input_ids"][:, 1:, None]).squeeze(-1)
    mask = enc["attention_mask"][:, 1:].float()
    (-(logp * mask).sum() / mask.sum()).backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def main() -> int:
    torch.set_num_threads(2)
    queries = heldout(2 * BATCH)
    batches = [queries[:BATCH], queries[BATCH:]]
    model, tokenizer = mini.load_policy(mini.policy_folder(None), "cpu")
    model.eval()

    prompts = [tokenizer.apply_chat_template(mini.messages(q), tokenize=False, add_generation_prompt=True)
               for q in batches[0]]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        model(**enc, logits_to_keep=1)  # warm-up
        t0 = time.perf_counter()
        model(**enc, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
    batch_s, serial_texts = [], []
    for batch in batches:
        t0 = time.perf_counter()
        serial_texts.append(mini.generate(model, tokenizer, batch, NEW_TOKENS, batch_size=BATCH))
        batch_s.append(time.perf_counter() - t0)
    serial_s, generate_s = sum(batch_s), batch_s[0]  # the prefill above is batch 0's
    parallel_s, parallel_texts = side_by_side(batches)

    model.train()
    grad_enc = tokenizer(prompts[:16], return_tensors="pt", padding=True)
    one, two = gradient(model, grad_enc, 1), gradient(model, grad_enc, 2)
    grads_equal = all(torch.equal(a, b) for a, b in zip(one, two))
    max_abs_diff = max(float((a - b).abs().max()) for a, b in zip(one, two))
    torch.set_num_threads(2)

    result = {
        "batch": BATCH, "new_tokens": NEW_TOKENS, "prompt_tokens_padded": int(enc["input_ids"].shape[1]),
        "prompt_tokens_mean": float(enc["attention_mask"].sum(1).float().mean()),
        "matmul_peak_gflops": matmul_peak_flops(torch.device("cpu")) / 1e9,
        "prefill_s": prefill_s, "generate_s": generate_s, "prefill_share": prefill_s / generate_s,
        "serial_2_threads_s": serial_s, "side_by_side_1_thread_s": parallel_s,
        "side_by_side_over_serial": parallel_s / serial_s, "texts_equal": parallel_texts == serial_texts,
        "gradient_1_vs_2_threads_equal": grads_equal, "gradient_max_abs_diff": max_abs_diff,
    }
    md = ("# Where the GRPO miniature's CPU time goes\n\n{header}"
          f"| measurement | value |\n|---|---|\n"
          f"| prefill of {BATCH} prompts ({result['prompt_tokens_mean']:.0f} tokens mean, "
          f"{result['prompt_tokens_padded']} padded) | {prefill_s:.1f} s |\n"
          f"| greedy generation of {NEW_TOKENS} tokens, the same batch | {generate_s:.1f} s |\n"
          f"| prefill share of generation | {result['prefill_share']:.2f} |\n"
          f"| 2 batches, one after the other, 2 threads | {serial_s:.1f} s |\n"
          f"| 2 batches side by side, 1 thread each | {parallel_s:.1f} s "
          f"({result['side_by_side_over_serial']:.2f}x the time) |\n"
          f"| texts side by side = texts serial | {result['texts_equal']} |\n"
          f"| gradient, 1 thread = 2 threads (bitwise) | {grads_equal} (max abs diff {max_abs_diff:.3g}) |\n"
          f"| matmul peak | {result['matmul_peak_gflops']:.0f} GFLOP/s |\n")
    write_result("miniature-cost-cpu", result, md)
    print(md.replace("{header}", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
