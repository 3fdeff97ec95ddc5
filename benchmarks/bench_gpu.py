"""The GPU benchmark: one GRPO step's rewards with a ViT-L/14 text tower over 10k / 100k / 1M items.

In-process: 1,024 rewrites of realistic lengths, encoded pad-free in fp16 and ranked exactly against a
float16 corpus of random 768-d embeddings (chunked, fp32 accumulation), timed end to end; beside it the
host tokenization alone, the encoder alone, the rank alone (at the default chunk and a 4x larger one), the
arithmetic alone (encoder FLOPs at the true token counts + the corpus scan) at the measured fp16 matmul peak of
the same GPU, the achieved fraction of that peak, the corpus' memory and the peak scoring memory.

Through the service (largest N): one in-process uvicorn server, loaded by ``loadgen.py`` in its own process
with 256 concurrent single-sample ``/get_reward`` clients; beside it the HTTP floor (the same clients sending
empty requests: parsing and answering only), the device worker's busy time, the mean batch, and a py-spy
profile of who holds the GIL (when py-spy is installed).

    bash benchmarks/gpu.sh                 # on the GPU machine (carries the wheels the image lacks)
    python benchmarks/bench_gpu.py --device cuda --sizes 10000 100000 1000000

Results are written after every step (``results/gpu-<gpu>.{md,json}``, and ``$OUT`` when set), so a run cut
short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import torch
from common import RESULTS, corpus_scan_flops, matmul_peak_flops, text_tower_flops, write_result
from loadgen import captions, rewrite_text, run_in_subprocess

from grape_rewards.corpus import CorpusIndex
from grape_rewards.corpus.rank_kernels import fused_mode, probe, use_fused
from grape_rewards.retrievers import create_retriever
from grape_rewards.retrievers.attention import choose_backend, time_backends
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


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def random_index(n: int, dim: int, device: torch.device, retriever, seed: int = 0) -> CorpusIndex:
    g = torch.Generator(device="cpu").manual_seed(seed)
    emb = torch.empty(n, dim, dtype=torch.float16, device=device)
    for start in range(0, n, 1 << 18):  # fill in blocks: bounded host memory
        block = torch.randn(min(1 << 18, n - start), dim, generator=g)
        emb[start:start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1).to(device, torch.float16)
    manifest = {"retriever": {"spec": retriever.spec, "fingerprint": retriever.fingerprint}, "count": n, "dim": dim}
    return CorpusIndex(emb, [f"item{i}" for i in range(n)], manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rewrites", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--service-seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--name", help="result file name (default gpu-<gpu model>)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    half = torch.float16 if device.type == "cuda" else torch.float32
    name = args.name or ("gpu-" + torch.cuda.get_device_name(0).split()[-1].lower() if device.type == "cuda"
                         else "gpu-bench-cpu")
    result: dict[str, Any] = {"model": args.model, "rewrites": args.rewrites, "rows": [], "service": None,
                              "errors": [], "fused_rank": use_fused(device), "fused_mode": fused_mode(),
                              "fused_probe": probe(device) if device.type == "cuda" else None}

    def save() -> None:
        write_result(name, result, markdown(result, args))
        if os.environ.get("OUT"):
            for suffix in (".md", ".json"):
                shutil.copy(RESULTS / f"{name}{suffix}", Path(os.environ["OUT"]) / f"{name}{suffix}")

    result["peak_flops"] = matmul_peak_flops(device, half, n=8192 if device.type == "cuda" else 2048)
    retriever = create_retriever(f"random:open_clip:{args.model}", device=args.device,
                                 dtype="fp16" if device.type == "cuda" else "fp32")
    tower = retriever.model.transformer
    rng = random.Random(0)
    texts = [rewrite_text(slots, rng.randrange(4)) for _, _, slots in captions(args.rewrites, seed=1)]
    tokens = [i.num_tokens for i in retriever.text_info(texts)]
    result["tokens_mean"], result["tokens_max"] = statistics.fmean(tokens), max(tokens)
    enc_flops = text_tower_flops(tokens, tower.width, tower.layers, retriever.dim)
    heads = tower.resblocks[0].attn.num_heads
    # Each attention kernel on this run's shape (one call, one layer); the encoder uses the fastest on the probe shape.
    per_kernel = time_backends(device, half, heads, tower.width // heads, batch=args.rewrites,
                               length=min(max(tokens), retriever.max_text_tokens))
    result["attention_ms"] = {k: v * 1e3 for k, v in per_kernel.items()}
    result["attention_kernel"] = choose_backend(device, half, heads, tower.width // heads)
    fast = retriever.fast_tokenizer
    if fast is not None:
        result["tokenize_ms"] = ms(timed(lambda: fast.pack(fast.encode(texts)), torch.device("cpu"), args.repeats))
    for batch in (1024, 256):  # one call (the scorer's GPU default) vs length-sorted calls of 256
        result[f"encode_b{batch}_ms"] = ms(timed(lambda b=batch: retriever.encode_texts(texts, batch_size=b), device,
                                                 args.repeats))
    result["encode_ms"] = result["encode_b1024_ms"]
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)

    scorer = None
    for n in args.sizes:
        scorer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            row, scorer = measure(n, retriever, texts, enc_flops, result, device, rng, args)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        except Exception as exc:  # keep what was measured; say what failed
            traceback.print_exc()
            result["errors"].append(f"N={n}: {type(exc).__name__}: {exc}")
        save()
    if scorer is not None and args.service_seconds > 0:
        try:
            result["service"] = service_point(scorer, args)
            print(json.dumps(result["service"]), flush=True)
        except Exception as exc:
            traceback.print_exc()
            result["errors"].append(f"service: {type(exc).__name__}: {exc}")
        save()
    print(markdown(result, args).replace("{header}", ""))


def measure(n: int, retriever, texts: list[str], enc_flops: float, result: dict[str, Any], device: torch.device,
            rng: random.Random, args: argparse.Namespace) -> tuple[dict[str, Any], RewardScorer]:
    """One corpus size, in-process: the whole step, the rank alone (two chunk sizes), memory."""
    index = random_index(n, retriever.dim, device, retriever)
    corpus_bytes = index.embeddings.numel() * index.embeddings.element_size()
    scorer = RewardScorer(retriever, index, RewardConfig(), cache_size=0)
    items = [RewardItem(rewrite=t, target_ids=[f"item{rng.randrange(n)}"]) for t in texts]
    queries = retriever.encode_texts(texts)
    targets = [it.target_ids for it in items]
    index.column_sums  # noqa: B018  (computed once at load in a service; not part of a step)
    rank = timed(lambda: index.rank(queries, targets), device, args.repeats)
    rank_big = timed(lambda: index.rank(queries, targets, chunk_elements=1 << 26), device, args.repeats)
    scorer.score(items)  # warm-up
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    step = timed(lambda: scorer.score(items), device, args.repeats)
    peak_mem = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else float("nan")
    flops = enc_flops + corpus_scan_flops(len(texts), n, retriever.dim)
    step_s = statistics.median(step)
    peak = result["peak_flops"]
    row = {"n": n, "step_ms": step_s * 1e3, "step_min_ms": min(step) * 1e3, "rank_ms": ms(rank),
           "rank_chunk26_ms": ms(rank_big), "arithmetic_ms_at_peak": flops / peak * 1e3,
           "scan_ms_at_peak": corpus_scan_flops(len(texts), n, retriever.dim) / peak * 1e3,
           "fraction_of_peak": flops / step_s / peak, "corpus_gb": corpus_bytes / 1e9,
           "scoring_peak_extra_gb": peak_mem / 1e9}
    return row, scorer


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def gil_profile(seconds: float) -> dict[str, Any] | None:
    """py-spy samples of whichever thread holds this process' GIL, grouped by what it is doing."""
    exe = shutil.which("py-spy") or next((str(Path(p) / "bin" / "py-spy") for p in sys.path
                                          if (Path(p) / "bin" / "py-spy").is_file()), None)
    if exe is None:
        return None
    raw = Path(tempfile.mkdtemp()) / "profile.txt"
    rate = 200
    proc = subprocess.run([exe, "record", "--pid", str(os.getpid()), "--duration", str(int(seconds)), "--rate",
                           str(rate), "--gil", "--nonblocking", "--format", "raw", "--output", str(raw)],
                          capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0 or not raw.is_file():
        return {"error": (proc.stderr or proc.stdout)[-400:]}
    groups: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        leaves[stack.split(";")[-1]] += k
        if "score_batch" in stack:
            groups["device worker: scoring (tokenize, launch kernels, assemble results)"] += k
        elif "_dispatch_forever" in stack or "MicroBatcher" in stack:
            groups["batcher (event loop)"] += k
        elif any(s in stack for s in ("uvicorn", "httptools", "GuardMiddleware", "protocol.py", "starlette")):
            groups["HTTP, JSON and parsing (event loop)"] += k
        else:
            groups["other"] += k
    expected = rate * int(seconds)
    return {"gil_busy": total / expected if expected else float("nan"),
            "groups": {g: c / max(1, total) for g, c in groups.most_common()},
            "top": [(f, c / max(1, total)) for f, c in leaves.most_common(12)]}


def service_point(scorer: RewardScorer, args: argparse.Namespace) -> dict[str, Any]:
    """Concurrent single-sample /get_reward clients (another process) against one in-process uvicorn server."""
    from grape_rewards.server import ServeConfig, create_app
    from grape_rewards.server.testing import ServerThread

    scorer.embedding_cache = type(scorer.embedding_cache)(65536)
    config = ServeConfig(index="<in-memory>", max_batch_size=1024, log_level="warning")
    app = create_app(scorer, config)
    ids_dir = Path(tempfile.mkdtemp())
    (ids_dir / "ids.json").write_text(json.dumps(scorer.index.ids[:100_000]))  # the load's targets
    with ServerThread(app) as server:
        floor = run_in_subprocess(server.url, ids_dir, args.concurrency, 5.0, empty=True)
        busy0 = metric(server.url, "grape_batch_seconds_sum")
        items0, batches0 = metric(server.url, "grape_batch_items_sum"), metric(server.url, "grape_batch_items_count")
        t0 = time.perf_counter()
        profile: dict[str, Any] = {}
        spy = threading.Thread(target=lambda: profile.update(
            {"p": gil_profile(min(8.0, args.service_seconds))}), daemon=True)
        threading.Timer(4.0, spy.start).start()
        load = run_in_subprocess(server.url, ids_dir, args.concurrency, args.service_seconds, empty=False)
        elapsed = time.perf_counter() - t0
        busy1 = metric(server.url, "grape_batch_seconds_sum")
        items1, batches1 = metric(server.url, "grape_batch_items_sum"), metric(server.url, "grape_batch_items_count")
        spy.join(timeout=60)
    return {"concurrency": args.concurrency, "rps": load["rps"], "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"],
            "errors": load["errors"], "worker_busy": (busy1 - busy0) / elapsed,
            "mean_batch": (items1 - items0) / max(1.0, batches1 - batches0),
            "http_floor_rps": floor["rps"], "http_floor_p50_ms": floor["p50_ms"], "gil_profile": profile.get("p")}


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    peak = result.get("peak_flops", float("nan"))
    lines = [f"# GPU benchmark: {args.model} text tower (random init, fp16), {args.rewrites} rewrites\n", "{header}",
             f"fp16 matmul peak (8192^3, same run): {peak / 1e12:.0f} TFLOP/s. Rewrites: mean "
             f"{result.get('tokens_mean', float('nan')):.1f} tokens (max {result.get('tokens_max', 0)}). Host "
             f"tokenization of the {args.rewrites} rewrites: {result.get('tokenize_ms', float('nan')):.1f} ms; "
             f"pad-free fp16 encoding (tokenization included): "
             f"{result.get('encode_b1024_ms', float('nan')):.1f} ms in one call, "
             f"{result.get('encode_b256_ms', float('nan')):.1f} ms in length-sorted calls of 256.\n",
             f"Attention kernel used: {result.get('attention_kernel') or 'PyTorch default'}; one layer's causal "
             f"attention over all {args.rewrites} rewrites at their longest length, by kernel: "
             + (", ".join(f"{k} {v:.3f} ms" for k, v in result.get("attention_ms", {}).items()) or "n/a") + ".\n",
             f"Rank scan: {'fused Triton max-and-count' if result.get('fused_rank') else 'torch ops'} "
             f"(GRAPE_FUSED_RANK={result.get('fused_mode')}; the kernel's check on one 1024 x 65,536 chunk: "
             f"{result.get('fused_probe')}).\n",
             "Targets: N = 1M step <= 25 ms on one H100; service >= 5,000 rewards/s at 256 clients; corpus "
             "2 bytes/dim/item; scoring memory bounded by the chunk.\n",
             "| N | step ms (median) | step ms (best) | rank ms (2^24 chunk) | rank ms (2^26 chunk) | arithmetic at "
             "peak ms | of which scan | of peak | corpus GB | scoring extra GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['n']:,} | {r['step_ms']:.1f} | {r['step_min_ms']:.1f} | {r['rank_ms']:.1f} | "
                     f"{r['rank_chunk26_ms']:.1f} | {r['arithmetic_ms_at_peak']:.2f} | {r['scan_ms_at_peak']:.2f} | "
                     f"{100 * r['fraction_of_peak']:.0f}% | {r['corpus_gb']:.2f} | {r['scoring_peak_extra_gb']:.2f} |")
    svc = result.get("service")
    if svc:
        n = result["rows"][-1]["n"] if result["rows"] else 0
        lines.append(f"\nService, N = {n:,}, {svc['concurrency']} concurrent single-sample clients (load generator "
                     f"in its own process): {svc['rps']:.0f} rewards/s, p50 {svc['p50_ms']:.1f} ms, p99 "
                     f"{svc['p99_ms']:.1f} ms, {svc['errors']} errors, mean batch {svc['mean_batch']:.0f}, device "
                     f"worker busy {100 * svc['worker_busy']:.0f}% of the time. HTTP floor (the same clients sending "
                     f"empty requests, nothing scored): {svc['http_floor_rps']:.0f} requests/s.")
        prof = svc.get("gil_profile")
        if prof and "groups" in prof:
            lines.append(f"\nWho holds the GIL under that load (py-spy, {100 * prof['gil_busy']:.0f}% of the time "
                         "held):\n")
            lines += [f"- {g}: {100 * share:.0f}%" for g, share in prof["groups"].items()]
            lines.append("\nTop frames: " + "; ".join(f"`{f}` {100 * s:.0f}%" for f, s in prof["top"][:8]))
    if result["errors"]:
        lines.append("\nErrors: " + "; ".join(result["errors"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
