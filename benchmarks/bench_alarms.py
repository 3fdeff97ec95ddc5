"""What the reward-hacking alarms and the ensemble cost, as ratios measured in one run on this machine.

Three scorers over the same MiniLM caption index (the corpus of ``bench_service.py``, built once and cached), fed
the same pre-formed batches of distinct rewrites (so the embedding cache never hits), interleaved round by round:

- ``alarms off``: ``RewardConfig(alarms={"enabled": False})``, the baseline;
- ``alarms on``: the default config (the scorer feeds every batch to the alarm monitor);
- ``ensemble k=2``: an :class:`~grape_rewards.ensemble.EnsembleScorer` of MiniLM twice (two scorers, two
  encodes and two scans per item), alarms on: it should cost about 2x a single scorer, not more.

Each point is the best of ``--rounds`` (the machine is shared); results go to ``benchmarks/results/alarms-cpu.md``
and ``.json`` with the command. ``--monitor-only`` measures just the alarm monitor's CPU time per sample
(``time.process_time``, so other work on the machine barely moves it) on synthetic GRPO traffic, no model.

    nice -n 19 python benchmarks/bench_alarms.py --corpus-size 5000 --batch-size 64 --rounds 5
    nice -n 19 python benchmarks/bench_alarms.py --monitor-only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench_service import items_of, minilm_index
from common import RESULTS, command, machine
from loadgen import Workload

from grape_rewards.corpus import CorpusIndex
from grape_rewards.corpus.files import atomic_write_bytes, atomic_write_json
from grape_rewards.ensemble import EnsembleScorer
from grape_rewards.retrievers import create_retriever
from grape_rewards.rewards import RewardConfig
from grape_rewards.rewards.config import AlarmConfig
from grape_rewards.scorer import RewardScorer


def rate(scorer: RewardScorer, batches: list[list[Any]]) -> float:
    """Rewards per second of ``scorer.score_batch`` over ``batches``."""
    t0 = time.perf_counter()
    for batch in batches:
        scorer.score_batch(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def monitor_cpu_per_sample(samples: int = 20_000, batch_size: int = 64) -> float:
    """CPU seconds per sample of :meth:`AlarmMonitor.observe` on GRPO groups of 8 caption-like rewrites."""
    import random

    from grape_rewards.alarms import AlarmMonitor

    rng = random.Random(0)
    texts = [f"A brown dog number {i % 500} catches a red frisbee in the sunny park" for i in range(samples)]
    groups = [f"q{i // 8}" for i in range(samples)]
    stats = [{"target_sim": rng.random(), "mean_sim": rng.random(), "margin": rng.random() - 0.5,
              "part_rank": rng.random(), "num_tokens": 14.0, "truncated": 0.0} for _ in range(samples)]
    monitor = AlarmMonitor()
    t0 = time.process_time()
    for i in range(0, samples, batch_size):
        monitor.observe(texts[i:i + batch_size], groups[i:i + batch_size], stats[i:i + batch_size])
    return (time.process_time() - t0) / samples


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-size", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="batches per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "grape-rewards-bench")
    p.add_argument("--out", type=Path, default=RESULTS / "alarms-cpu")
    p.add_argument("--monitor-only", action="store_true", help="only the alarm monitor's CPU time per sample")
    args = p.parse_args()
    if args.monitor_only:
        per = [monitor_cpu_per_sample() for _ in range(args.rounds)]
        results = {"command": command(), "machine": machine(), "loadavg_end": os.getloadavg(),
                   "monitor_cpu_us_per_sample": [x * 1e6 for x in per]}
        atomic_write_json(args.out.with_name(args.out.name + "-monitor").with_suffix(".json"), results)
        print(f"alarm monitor: {min(per) * 1e6:.1f} us CPU per sample (best of {len(per)}; every round: "
              f"{', '.join(f'{x * 1e6:.1f}' for x in per)})")
        return 0

    retriever = create_retriever("text:all-MiniLM-L6-v2", device="cpu")
    index_dir, slots = minilm_index(retriever, args.corpus_size, args.cache_dir)
    index = CorpusIndex.load(index_dir, expected_fingerprint=retriever.fingerprint)
    scorers = {
        "alarms off": RewardScorer(retriever, index, RewardConfig(alarms=AlarmConfig(enabled=False))),
        "alarms on": RewardScorer(retriever, index, RewardConfig()),
        "ensemble k=2": EnsembleScorer([retriever, retriever], [index, index], RewardConfig()),
    }
    workload = Workload(index.ids, slots)
    per = args.batches * args.batch_size
    start = 0
    rounds: dict[str, list[float]] = {name: [] for name in scorers}
    for scorer in scorers.values():  # warm-up
        scorer.score_batch(items_of(workload, start, args.batch_size))
        start += args.batch_size
    for r in range(args.rounds):
        for name, scorer in scorers.items():
            items = items_of(workload, start, per)  # fresh rewrites: no cache hits
            start += per
            batches = [items[i:i + args.batch_size] for i in range(0, per, args.batch_size)]
            rounds[name].append(rate(scorer, batches))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}/s" for n, v in rounds.items()), flush=True)
    best = {name: max(v) for name, v in rounds.items()}
    ratio_alarms = best["alarms on"] / best["alarms off"]
    ratio_ensemble = best["alarms off"] / best["ensemble k=2"]
    results = {"command": command(), "machine": machine(), "loadavg_end": os.getloadavg(),
               "corpus_size": len(index), "batch_size": args.batch_size, "rounds": rounds, "best": best,
               "alarms_on_over_off": ratio_alarms, "ensemble_time_over_single": ratio_ensemble}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), results)
    m = results["machine"]
    lines = ["# Alarms and ensemble: cost in-process, ratios in one run", "",
             f"- command: `{results['command']}`", f"- date: {m['date']}; {m['cpu']}, {m['cpu_count']} cores, "
             f"torch {m['torch']}; load average at end {', '.join(f'{x:.2f}' for x in results['loadavg_end'])}",
             f"- MiniLM over {len(index):,} captions, batches of {args.batch_size} distinct rewrites "
             f"({args.batches} per measurement), best of {args.rounds} interleaved rounds", "",
             "| scorer | rewards/s (best) | every round |", "|---|---:|---|"]
    lines += [f"| {n} | {best[n]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for n, v in rounds.items()]
    lines += ["", f"- alarms on / off throughput: {ratio_alarms:.3f} (target >= 0.95)",
              f"- ensemble of 2 / single scorer time per reward: {ratio_ensemble:.2f} (target <= 2 + noise: "
              "k encodes + k scans)", ""]
    atomic_write_bytes(args.out.with_suffix(".md"), "\n".join(lines).encode("utf-8"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
