"""Where one GPU reward step spends its time: torch.profiler (kernels and host ops) and cProfile (Python) of
``RewardScorer.score`` on 1,024 rewrites, ViT-L/14 text tower (random init, fp16), a 1M-item fp16 corpus; plus
the pieces of one rank chunk timed alone (the fp32-accumulating matmul, the max, the count).

    python benchmarks/profile_gpu.py            # on the GPU machine, after gpu.sh's wheel install
"""

from __future__ import annotations

import cProfile
import io
import pstats
import random
import time

import torch
from bench_gpu import random_index, timed
from loadgen import captions, rewrite_text

from grape_rewards.retrievers import create_retriever
from grape_rewards.rewards import RewardConfig
from grape_rewards.scorer import RewardItem, RewardScorer


def main() -> None:
    device = torch.device("cuda")
    retriever = create_retriever("random:open_clip:ViT-L-14", device="cuda", dtype="fp16")
    params = {p.dtype for p in retriever.model.parameters()}
    print("model parameter dtypes:", params, "| sdpa backends: flash", torch.backends.cuda.flash_sdp_enabled(),
          "mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled())
    rng = random.Random(0)
    texts = [rewrite_text(slots, rng.randrange(4)) for _, _, slots in captions(1024, seed=1)]
    n = 1_000_000
    index = random_index(n, retriever.dim, device, retriever)
    scorer = RewardScorer(retriever, index, RewardConfig(), cache_size=0)
    items = [RewardItem(rewrite=t, target_ids=[f"item{rng.randrange(n)}"]) for t in texts]
    for _ in range(3):
        scorer.score(items)

    # The rank chunk's pieces, alone.
    q = torch.nn.functional.normalize(torch.randn(1024, retriever.dim, device=device), dim=1)
    block = index.embeddings[: 1 << 16]
    thr = torch.zeros(1024, 1, device=device)
    q16 = q.half()
    pieces = {
        "mm fp16 in, fp32 out (out_dtype)": lambda: torch.mm(q16, block.T, out_dtype=torch.float32),
        "mm fp16 in, fp16 out": lambda: torch.mm(q16, block.T),
        "mm fp32 (block converted)": lambda: q @ block.float().T,
    }
    scores = torch.mm(q16, block.T, out_dtype=torch.float32)
    pieces["amax(1)"] = lambda: scores.amax(1)
    pieces["(scores > thr).sum(1)"] = lambda: (scores > thr).sum(1)
    pieces["scores.clone().gt_(thr).sum(1, float32)"] = lambda: scores.clone().gt_(thr).sum(1, dtype=torch.float32)
    for name, fn in pieces.items():
        t = sorted(timed(fn, device, 10))[5]
        print(f"{name:45s} {t * 1e3:7.3f} ms per 1024 x 65536 chunk ({t * 1e3 * n / (1 << 16):6.1f} ms per 1M)")

    for name, fn in [("encode 1024 texts", lambda: retriever.encode_texts(texts, batch_size=1024)),
                     ("rank 1024 x 1M", lambda: index.rank(scorer.encode(texts)[0], [it.target_ids for it in items],
                                                          chunk_elements=1 << 26)),
                     ("score (whole step)", lambda: scorer.score(items))]:
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        print(f"\n=== {name}: 3 calls, by device time ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print(f"=== {name}: by host self time ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    profiler.enable()
    scorer.score(items)
    torch.cuda.synchronize()
    profiler.disable()
    print(f"\n=== cProfile of one step ({(time.perf_counter() - t0) * 1e3:.1f} ms under the profiler) ===")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue()[-9000:])


if __name__ == "__main__":
    main()
