"""Where the GRPO miniature's time goes on a CPU, and what its two cuts gain against the plain way, in one run.

Measured on the miniature's own policy (SmolLM2-135M-Instruct, float32) and held-out prompts:

- **prefill share**: one forward pass over a batch of 48 prompts (last position's logits only, as ``generate``
  does) against plain greedy generation of 24 tokens for the same batch (``model.generate`` on the left-padded
  batch, as the miniature did before its cuts);
- **shared prefill** (``grpo_miniature.generate_sharing_prefill``): the system prompt prefilled once per batch and
  each prompt once for its samples, against plain ``generate``: greedy on 48 prompts, and best-of-8 on 6 prompts
  (48 rows, same seed); the tokens of both ways are compared;
- **completion-only log-probabilities** (``grpo_miniature.completion_logprob_trainer``): the forward and backward
  pass of one GRPO step's log-probabilities (2 prompts x 8 sampled completions), through TRL's fused LM head
  (every position on CPU) against the completion positions only;
- **side by side**: two batches generated one after the other with 2 threads, against the same two batches in two
  concurrent processes of 1 thread each (how two arms could train side by side), and whether the texts match;
- **thread invariance**: the gradient of one training-shaped forward and backward pass (16 sequences) with 1 thread
  and with 2 threads, bitwise. Arms run side by side reproduce the recorded figures only if this holds.

    python benchmarks/bench_miniature_cost.py          # ~5 min on 2 cores; results/miniature-cost-cpu.{json,md}
"""

from __future__ import annotations

import math
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
BEST_OF = 8


def heldout(count: int) -> list[task.MiniQuery]:
    corpus = task.build_corpus(seed=0)
    return [q for q in task.build_queries(corpus, seed=0) if q.split == "heldout"][:count]


def plain_generate(model: Any, tokenizer: Any, queries: list[task.MiniQuery], samples: int = 1,
                   seed: int = 0) -> list[str]:
    """The plain way: ``model.generate`` on the left-padded batch, each prompt repeated ``samples`` times."""
    prompts = [tokenizer.apply_chat_template(mini.messages(q), tokenize=False, add_generation_prompt=True)
               for q in queries for _ in range(samples)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                             **mini.decoding(samples))
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def sharing_generate(model: Any, tokenizer: Any, queries: list[task.MiniQuery], samples: int = 1,
                     seed: int = 0) -> list[str]:
    """The miniature's way (one batch): :func:`grpo_miniature.generate_sharing_prefill`."""
    ids = [tokenizer(tokenizer.apply_chat_template(mini.messages(q), tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for q in queries]
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = mini.generate_sharing_prefill(model, ids, samples, pad_token_id=tokenizer.pad_token_id,
                                            max_new_tokens=NEW_TOKENS, **mini.decoding(samples))
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def seconds(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - t0, value


def logprob_pass_seconds(trainer: Any, method: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int,
                         repeats: int = 3) -> float:
    """Best of ``repeats``: the forward and backward pass of one GRPO step's log-probabilities and entropies."""
    best = math.inf
    for _ in range(repeats):
        trainer.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logps, _, _ = method(trainer, trainer.model, ids, mask, keep, compute_entropy=True)
        completion = mask[:, -keep:].float()
        (-(logps * completion).sum() / completion.sum()).backward()
        best = min(best, time.perf_counter() - t0)
    return best


def logprob_cut(tokenizer: Any, queries: list[task.MiniQuery], completions: list[str]) -> dict[str, float]:
    """TRL's fused LM head (every position on CPU) against the completion positions only, on one GRPO step's batch."""
    import tempfile

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = [tokenizer.apply_chat_template(mini.messages(q), tokenize=False, add_generation_prompt=True)
               for q in queries for _ in range(len(completions) // len(queries))]
    prompt = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    completion = tokenizer(completions, return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False)
    ids = torch.cat([prompt["input_ids"], completion["input_ids"]], 1)
    mask = torch.cat([prompt["attention_mask"], completion["attention_mask"]], 1)
    keep = completion["input_ids"].shape[1]
    model, _ = mini.load_policy(mini.policy_folder(None), "cpu")
    with tempfile.TemporaryDirectory() as work:
        args = GRPOConfig(output_dir=work, use_cpu=True, per_device_train_batch_size=16, num_generations=8,
                          max_completion_length=NEW_TOKENS, beta=0.0, report_to="none", bf16=False)
        trainer = mini.completion_logprob_trainer()(
            model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
            train_dataset=Dataset.from_list([{"prompt": "a"}]), processing_class=tokenizer)
        logprob_pass_seconds(trainer, GRPOTrainer._get_per_token_logps_and_entropies, ids, mask, keep, 1)  # warm-up
        fused = logprob_pass_seconds(trainer, GRPOTrainer._get_per_token_logps_and_entropies, ids, mask, keep)
        plain = logprob_pass_seconds(trainer, type(trainer)._get_per_token_logps_and_entropies, ids, mask, keep)
    return {"sequences": int(ids.shape[0]), "positions": int(ids.shape[1]), "completion_positions": keep,
            "fused_head_s": fused, "completion_only_s": plain, "completion_only_over_fused": plain / fused}


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
        prefill_s, _ = seconds(model, **enc, logits_to_keep=1)
    generate_s, plain_greedy = seconds(plain_generate, model, tokenizer, batches[0])
    sharing_s, sharing_greedy = seconds(sharing_generate, model, tokenizer, batches[0])
    bon = batches[0][:BATCH // BEST_OF]
    plain_bon_s, plain_bon = seconds(plain_generate, model, tokenizer, bon, BEST_OF, 1)
    sharing_bon_s, sharing_bon = seconds(sharing_generate, model, tokenizer, bon, BEST_OF, 1)
    logprobs = logprob_cut(tokenizer, bon[:2], plain_bon[:2 * BEST_OF])

    batch_s, serial_texts = [], []
    for batch in batches:
        t0 = time.perf_counter()
        serial_texts.append(mini.generate(model, tokenizer, batch, NEW_TOKENS, batch_size=BATCH))
        batch_s.append(time.perf_counter() - t0)
    serial_s = sum(batch_s)
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
        "greedy_sharing_s": sharing_s, "greedy_sharing_over_plain": sharing_s / generate_s,
        "greedy_tokens_equal": sum(a == b for a, b in zip(plain_greedy, sharing_greedy)),
        "best_of": BEST_OF, "best_of_prompts": len(bon), "best_of_plain_s": plain_bon_s,
        "best_of_sharing_s": sharing_bon_s, "best_of_sharing_over_plain": sharing_bon_s / plain_bon_s,
        "best_of_samples_equal": sum(a == b for a, b in zip(plain_bon, sharing_bon)),
        "logprobs": logprobs,
        "serial_2_threads_s": serial_s, "side_by_side_1_thread_s": parallel_s,
        "side_by_side_over_serial": parallel_s / serial_s, "texts_equal": parallel_texts == serial_texts,
        "gradient_1_vs_2_threads_equal": grads_equal, "gradient_max_abs_diff": max_abs_diff,
    }
    rows = len(bon) * BEST_OF
    md = ("# Where the GRPO miniature's CPU time goes\n\n{header}"
          f"| measurement | value |\n|---|---|\n"
          f"| prefill of {BATCH} prompts ({result['prompt_tokens_mean']:.0f} tokens mean, "
          f"{result['prompt_tokens_padded']} padded) | {prefill_s:.1f} s |\n"
          f"| plain greedy generation of {NEW_TOKENS} tokens, the same batch | {generate_s:.1f} s |\n"
          f"| prefill share of generation | {result['prefill_share']:.2f} |\n"
          f"| greedy, shared prefill | {sharing_s:.1f} s ({result['greedy_sharing_over_plain']:.2f}x plain); "
          f"tokens equal in {result['greedy_tokens_equal']}/{BATCH} rows |\n"
          f"| best-of-{BEST_OF}, {len(bon)} prompts ({rows} rows), plain | {plain_bon_s:.1f} s |\n"
          f"| best-of-{BEST_OF}, shared prefill, same seed | {sharing_bon_s:.1f} s "
          f"({result['best_of_sharing_over_plain']:.2f}x plain); samples equal in "
          f"{result['best_of_samples_equal']}/{rows} rows |\n"
          f"| log-probabilities, forward + backward, {logprobs['sequences']} sequences of {logprobs['positions']} "
          f"positions: TRL's fused head | {logprobs['fused_head_s']:.2f} s |\n"
          f"| the same, completion positions only ({logprobs['completion_positions']}) | "
          f"{logprobs['completion_only_s']:.2f} s ({logprobs['completion_only_over_fused']:.2f}x) |\n"
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
