"""What the graded ranks add to the corpus scan (#23: at most 1.5x the plain rank), on the CPU, in one run.

A corpus of 50,000 unit vectors (384-d, MiniLM's width) and 1,024 queries, each near its target (a noisy copy, so
that ranks spread from 1 to the thousands as a GRPO batch's do). Timed per 1,024 samples, interleaved rounds
(every variant once per round), the median over rounds:

- ``plain``: ``corpus_rank`` as the reward's default scans (rank, mean, best non-target; exact ties);
- ``margin``: plus the target's neighbours (``ScanExtras(neighbours=True)``, the margin-graded rank);
- ``soft``: plus the summed sigmoids (``ScanExtras(soft_temperature=0.02)``, the soft rank).

    python benchmarks/bench_scan.py [--rounds 7] [--items 50000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import write_result

from grape_rewards.corpus import ScanExtras, corpus_rank

VARIANTS: dict[str, ScanExtras] = {"plain": ScanExtras(), "margin": ScanExtras(neighbours=True),
                                   "soft": ScanExtras(soft_temperature=0.02)}


def problem(items: int, queries: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    corpus = torch.nn.functional.normalize(torch.randn(items, dim, generator=g), dim=1)
    targets = torch.randint(0, items, (queries,), generator=g)
    noise = torch.rand(queries, 1, generator=g) * 12.0  # from near copies to far: ranks 1 .. thousands
    q = torch.nn.functional.normalize(corpus[targets] + noise * torch.randn(queries, dim, generator=g) / dim ** 0.5,
                                      dim=1)
    return q, corpus, [[int(t)] for t in targets]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    q, corpus, targets = problem(args.items, args.queries, args.dim)
    stats = {name: corpus_rank(q, corpus, targets, extras=extras) for name, extras in VARIANTS.items()}
    assert all(torch.equal(s.rank, stats["plain"].rank) for s in stats.values())  # extras never change a rank
    ranks = stats["plain"].rank.float()
    load_before = list(os.getloadavg())
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, extras in VARIANTS.items():
            start = time.perf_counter()
            corpus_rank(q, corpus, targets, extras=extras)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "items": args.items, "queries": args.queries, "dim": args.dim, "rounds": args.rounds,
        "rank_quartiles": [float(x) for x in torch.quantile(ranks, torch.tensor([0.25, 0.5, 0.75]))],
        "seconds_per_1024": {name: m * 1024 / args.queries for name, m in median.items()},
        "ratio_to_plain": {name: m / median["plain"] for name, m in median.items()},
        "all_seconds": times,
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
    }
    lines = ["# The graded ranks' cost in the corpus scan (CPU)", "", "{header}",
             f"{args.queries} queries x {args.items:,} items x {args.dim} dims, float32; ranks' quartiles "
             f"{result['rank_quartiles']}; median of {args.rounds} interleaved rounds. Load average (1, 5, 15 min) "
             f"{', '.join(f'{x:.1f}' for x in load_before)} before, "
             f"{', '.join(f'{x:.1f}' for x in result['load_average']['after'])} after: on a busy machine the "
             "ratios, measured in the same rounds, mean more than the seconds.", "",
             "| scan | s per 1,024 samples | x plain |", "|---|---|---|"]
    for name in VARIANTS:
        lines.append(f"| {name} | {result['seconds_per_1024'][name]:.3f} | {result['ratio_to_plain'][name]:.2f} |")
    write_result("scan-cpu", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
