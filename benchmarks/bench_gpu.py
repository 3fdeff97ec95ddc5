"""The GPU benchmark: one GRPO step's rewards with a ViT-L/14 text tower over 10k / 100k / 1M items.

In-process: 1,024 rewrites of realistic lengths, encoded pad-free in fp16 and ranked exactly against a
float16 corpus of random 768-d embeddings (chunked, fp32 accumulation), timed end to end; beside it the
arithmetic alone (encoder FLOPs at the true token counts + the corpus scan) at the measured fp16 matmul
peak of the same GPU, the achieved fraction of that peak, the corpus' memory and the peak scoring memory.
Through the service: 256 concurrent single-sample ``/get_reward`` clients against one process.

    bash benchmarks/gpu.sh                 # on the GPU machine (carries the wheels the image lacks)
    python benchmarks/bench_gpu.py --device cuda --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time

import httpx
import torch
from common import corpus_scan_flops, matmul_peak_flops, text_tower_flops, write_result
from loadgen import PROMPT, captions, rewrite_text, run_load

from grape_rewards.corpus import CorpusIndex
from grape_rewards.retrievers import create_retriever
from grape_rewards.rewards import RewardConfig
from grape_rewards.scorer import RewardItem, RewardScorer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def random_index(n: int, dim: int, device: torch.device, retriever, seed: int = 0) -> CorpusIndex:
    g = torch.Generator(device="cpu").manual_seed(seed)
    emb = torch.empty(n, dim, dtype=torch.float16, device=device)
    for start in range(0, n, 1 << 18):  # fill in blocks: bounded host memory
        block = torch.randn(min(1 << 18, n - start), dim, generator=g)
        emb[start:start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1).to(device, torch.float16)
    manifest = {"retriever": {"spec": retriever.spec, "fingerprint": retriever.fingerprint}, "count": n, "dim": dim}
    return CorpusIndex(emb, [f"item{i}" for i in range(n)], manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rewrites", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--service-seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    half = torch.float16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(device, half, n=8192 if device.type == "cuda" else 2048)
    retriever = create_retriever(f"random:open_clip:{args.model}", device=args.device,
                                 dtype="fp16" if device.type == "cuda" else "fp32")
    tower = retriever.model.transformer
    rng = random.Random(0)
    texts = [rewrite_text(slots, rng.randrange(4)) for _, _, slots in captions(args.rewrites, seed=1)]
    tokens = [i.num_tokens for i in retriever.text_info(texts)]
    enc_flops = text_tower_flops(tokens, tower.width, tower.layers, retriever.dim)
    encode = timed(lambda: retriever.encode_texts(texts, batch_size=args.rewrites), device, args.repeats)

    rows = []
    for n in args.sizes:
        rows.append(measure(n, retriever, texts, enc_flops, encode, peak, device, rng, args))
        print(json.dumps(rows[-1]), flush=True)

    lines = [f"# GPU benchmark: {args.model} text tower (random init, fp16), {args.rewrites} rewrites\n", "{header}",
             f"fp16 matmul peak (8192^3, same run): {peak / 1e12:.0f} TFLOP/s. Mean rewrite length "
             f"{statistics.fmean(tokens):.1f} tokens (max {max(tokens)}).\n",
             "Targets: N = 1M step <= 25 ms on one H100; service >= 5,000 rewards/s at 256 clients; corpus "
             "2 bytes/dim/item; scoring memory bounded by the chunk.\n",
             "| N | step ms | encode ms | rank ms | arithmetic at peak ms | of peak | corpus GB | scoring extra GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['step_ms']:.1f} | {r['encode_ms']:.1f} | {r['rank_ms']:.1f} | "
                     f"{r['arithmetic_ms_at_peak']:.2f} | {100 * r['fraction_of_peak']:.0f}% | {r['corpus_gb']:.2f} | "
                     f"{r['scoring_peak_extra_gb']:.2f} |")
    svc = rows[-1].get("service")
    if svc:
        lines.append(f"\nService, N = {rows[-1]['n']:,}, {svc['concurrency']} concurrent single-sample clients: "
                     f"{svc['rps']:.0f} rewards/s, p50 {svc['p50_ms']:.1f} ms, p99 {svc['p99_ms']:.1f} ms, mean batch "
                     f"{svc.get('mean_batch', float('nan')):.0f}, device worker busy {100 * svc['worker_busy']:.0f}% "
                     "of the time (the rest is HTTP parsing, JSON and the event loop: see the note in README).")
    markdown = "\n".join(lines) + "\n"
    write_result(f"gpu-{torch.cuda.get_device_name(0).split()[-1].lower() if device.type == 'cuda' else 'cpu'}",
                 {"peak_flops": peak, "rows": rows, "tokens_mean": statistics.fmean(tokens)}, markdown)
    print(markdown)


def measure(n: int, retriever, texts: list[str], enc_flops: float, encode: list[float], peak: float,
            device: torch.device, rng: random.Random, args: argparse.Namespace) -> dict:
    """One corpus size: the in-process step (and, for the largest size, the service)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    index = random_index(n, retriever.dim, device, retriever)
    corpus_bytes = index.embeddings.numel() * index.embeddings.element_size()
    scorer = RewardScorer(retriever, index, RewardConfig(), cache_size=0)
    items = [RewardItem(rewrite=t, target_ids=[f"item{rng.randrange(n)}"]) for t in texts]
    queries = retriever.encode_texts(texts)
    targets = [it.target_ids for it in items]
    rank = timed(lambda: index.rank(queries, targets), device, args.repeats)
    scorer.score(items)  # warm-up
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    step = timed(lambda: scorer.score(items), device, args.repeats)
    peak_mem = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else float("nan")
    flops = enc_flops + corpus_scan_flops(len(texts), n, retriever.dim)
    step_s = statistics.median(step)
    row = {"n": n, "step_ms": step_s * 1e3, "encode_ms": statistics.median(encode) * 1e3,
           "rank_ms": statistics.median(rank) * 1e3, "arithmetic_ms_at_peak": flops / peak * 1e3,
           "fraction_of_peak": flops / step_s / peak, "corpus_gb": corpus_bytes / 1e9,
           "scoring_peak_extra_gb": peak_mem / 1e9}
    if n == max(args.sizes):
        row["service"] = service_point(scorer, texts, targets, args)
    return row


def service_point(scorer: RewardScorer, texts: list[str], targets: list[list[str]], args: argparse.Namespace) -> dict:
    """256 concurrent single-sample /get_reward clients against one in-process uvicorn server."""
    from grape_rewards.server import ServeConfig, create_app
    from grape_rewards.server.testing import ServerThread

    scorer.embedding_cache = type(scorer.embedding_cache)(65536)
    config = ServeConfig(index="<in-memory>", max_batch_size=1024, log_level="warning")
    app = create_app(scorer, config)

    def body(i: int) -> bytes:
        j = i % len(texts)
        prompt = PROMPT.format(query=f"query {j}")
        return json.dumps({"query": [prompt + f"<answer>{texts[j]} {i}</answer><|im_end|>"], "prompts": [prompt],
                           "labels": [json.dumps({"target_ids": targets[j]})]}).encode()

    def metric(url: str, name: str) -> float:
        text = httpx.get(url + "/metrics", timeout=30).text
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")

    with ServerThread(app) as server:
        t0 = time.perf_counter()
        busy0 = metric(server.url, "grape_batch_seconds_sum")
        items0, batches0 = metric(server.url, "grape_batch_items_sum"), metric(server.url, "grape_batch_items_count")
        result = asyncio.run(run_load(server.url + "/get_reward", body, args.concurrency, args.service_seconds,
                                      warmup_s=2.0))
        elapsed = time.perf_counter() - t0
        busy1 = metric(server.url, "grape_batch_seconds_sum")
        items1, batches1 = metric(server.url, "grape_batch_items_sum"), metric(server.url, "grape_batch_items_count")
    row = result.row()
    row["worker_busy"] = (busy1 - busy0) / elapsed
    row["mean_batch"] = (items1 - items0) / max(1.0, batches1 - batches0)
    return row


if __name__ == "__main__":
    main()
