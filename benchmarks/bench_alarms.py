"""What the reward-hacking alarms and the ensemble cost, as ratios measured in one run on this machine.

Three scorers over the same MiniLM caption index (the corpus of ``bench_service.py``, built once and cached), fed
the same pre-formed batches of distinct rewrites (so the embedding cache never hits), interleaved round by round:

- ``alarms off``: ``RewardConfig(alarms={"enabled": False})``, the baseline;
- ``alarms on``: the default config (the scorer feeds every batch to the alarm monitor);
- ``ensemble k=2``: an :class:`~grape_rewards.ensemble.EnsembleScorer` of MiniLM twice (two scorers, two
  encodes and two scans per item), alarms on: it should cost about 2x a single scorer, not more.

Each point is the best of ``--rounds`` (the machine is shared), beside the median of the per-round ratios; results
go to ``benchmarks/results/alarms-cpu.md`` and ``.json`` with the command. The ensemble's target is read against the
single scorer's own encode and scan times (``ScoredBatch.timings``): k retrievers may add k - 1 encodes and scans,
nothing more.

``--service`` measures what the issue's target names: throughput of ``grape-rewards serve`` at concurrency 64
(``bench_service.py``'s load generator, single-sample OpenRLHF requests, 50,000 MiniLM captions) with the alarms
on (the default) and off (``--reward-config`` with ``alarms: {enabled: false}``), two servers measured in
interleaved rounds; results go to ``benchmarks/results/alarms-service-cpu.md``.

``--monitor-only`` measures just the alarm monitor's CPU time per sample (``time.process_time``, so other work on the
machine barely moves it) on synthetic GRPO traffic, no model.

    python benchmarks/bench_alarms.py --corpus-size 5000 --batch-size 64 --rounds 7
    python benchmarks/bench_alarms.py --service --rounds 4
    python benchmarks/bench_alarms.py --monitor-only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench_service import ServerProcess, items_of, load_point, minilm_index
from common import RESULTS, command, machine
from loadgen import Workload

from grape_rewards.corpus import CorpusIndex
from grape_rewards.corpus.files import atomic_write_bytes, atomic_write_json
from grape_rewards.ensemble import EnsembleScorer
from grape_rewards.retrievers import create_retriever
from grape_rewards.rewards import RewardConfig
from grape_rewards.rewards.config import AlarmConfig
from grape_rewards.scorer import RewardScorer


def rate(scorer: RewardScorer, batches: list[list[Any]]) -> tuple[float, float]:
    """Rewards per second of ``scorer.score_batch`` over ``batches``, and the seconds per reward of its encodes and
    rank scans (``encode_s + rank_s``, summed over the members of an ensemble)."""
    t0 = time.perf_counter()
    encode_scan = 0.0
    for batch in batches:
        timings = scorer.score_batch(batch).timings
        encode_scan += timings["encode_s"] + timings["rank_s"]
    n = sum(len(b) for b in batches)
    return n / (time.perf_counter() - t0), encode_scan / n


def service_main(args: argparse.Namespace) -> int:
    """Alarms on vs off through the reward service at ``--concurrency``, interleaved rounds (see the docstring)."""
    import tempfile

    retriever = create_retriever("text:all-MiniLM-L6-v2", device="cpu")
    index_dir, slots = minilm_index(retriever, args.service_corpus_size, args.cache_dir)
    index = CorpusIndex.load(index_dir, expected_fingerprint=retriever.fingerprint)
    workload_start = 0
    off_yaml = Path(tempfile.mkdtemp()) / "alarms-off.yaml"
    off_yaml.write_text("alarms:\n  enabled: false\n")
    logs = {mode: args.cache_dir / f"serve-alarms-{mode}.log" for mode in ("on", "off")}
    rows: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    spec = "text:all-MiniLM-L6-v2"
    with ServerProcess(index_dir, spec, 256, logs["on"]) as on, \
            ServerProcess(index_dir, spec, 256, logs["off"], ["--reward-config", str(off_yaml)]) as off:
        for r in range(args.rounds):
            order = (("on", on), ("off", off)) if r % 2 == 0 else (("off", off), ("on", on))
            for mode, server in order:
                workload_start += 10_000_000
                workload = Workload(index.ids, slots, offset=workload_start)  # rewrites no earlier point has seen
                row = load_point(server, workload, args.concurrency, args.duration, args.warmup)
                rows[mode].append(row)
                print(f"round {r + 1} alarms {mode:3s}: {row['rps']:7.1f} rewards/s  mean batch "
                      f"{row['mean_batch']:5.1f}  errors {row['errors']}  (load {row['loadavg']:.2f})", flush=True)
    ratios = [a["rps"] / b["rps"] for a, b in zip(rows["on"], rows["off"])]
    best = {mode: max(x["rps"] for x in v) for mode, v in rows.items()}
    results = {"command": command(), "machine": machine(), "loadavg_end": os.getloadavg(),
               "corpus_size": len(index), "concurrency": args.concurrency, "duration_s": args.duration,
               "rounds": rows, "best": best, "on_over_off_best": best["on"] / best["off"],
               "on_over_off_per_round": ratios, "on_over_off_median": statistics.median(ratios)}
    out = args.out.with_name("alarms-service-cpu") if args.out.name == "alarms-cpu" else args.out
    atomic_write_json(out.with_suffix(".json"), results)
    m = results["machine"]
    lines = ["# Alarms on vs off through the reward service (CPU)", "",
             f"- command: `{results['command']}`", f"- date: {m['date']}; {m['cpu']}, {m['cpu_count']} cores, "
             f"torch {m['torch']}; load average at end {', '.join(f'{x:.2f}' for x in results['loadavg_end'])}",
             f"- `grape-rewards serve`, MiniLM over {len(index):,} captions, single-sample OpenRLHF `/get_reward` "
             f"requests at concurrency {args.concurrency}, {args.duration:.0f} s per point after "
             f"{args.warmup:.0f} s warm-up; two servers (alarms on = default, off = `alarms: {{enabled: false}}`) "
             f"measured in {args.rounds} interleaved rounds (the order alternates)", "",
             "| round | alarms on: rewards/s | mean batch | alarms off: rewards/s | mean batch | on / off |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {i + 1} | {a['rps']:.1f} | {a['mean_batch']:.1f} | {b['rps']:.1f} | {b['mean_batch']:.1f} | "
              f"{a['rps'] / b['rps']:.3f} |" for i, (a, b) in enumerate(zip(rows["on"], rows["off"]))]
    lines += ["", f"- on / off, median of the rounds: {results['on_over_off_median']:.3f}; best on / best off: "
              f"{results['on_over_off_best']:.3f} (target: the alarms cost < 5%, i.e. >= 0.95)", ""]
    atomic_write_bytes(out.with_suffix(".md"), "\n".join(lines).encode("utf-8"))
    print("\n".join(lines))
    return 0


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
    p.add_argument("--service", action="store_true", help="alarms on vs off through the reward service")
    p.add_argument("--service-corpus-size", type=int, default=50_000, help="--service: captions in the index")
    p.add_argument("--concurrency", type=int, default=64, help="--service: requests in flight")
    p.add_argument("--duration", type=float, default=8.0, help="--service: measured seconds per point")
    p.add_argument("--warmup", type=float, default=2.0, help="--service: seconds before measuring, per point")
    args = p.parse_args()
    if args.service:
        return service_main(args)
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
    encode_scan: dict[str, list[float]] = {name: [] for name in scorers}
    for scorer in scorers.values():  # warm-up
        scorer.score_batch(items_of(workload, start, args.batch_size))
        start += args.batch_size
    for r in range(args.rounds):
        for name, scorer in scorers.items():
            items = items_of(workload, start, per)  # fresh rewrites: no cache hits
            start += per
            batches = [items[i:i + args.batch_size] for i in range(0, per, args.batch_size)]
            rps, seconds = rate(scorer, batches)
            rounds[name].append(rps)
            encode_scan[name].append(seconds)
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}/s" for n, v in rounds.items()), flush=True)
    best = {name: max(v) for name, v in rounds.items()}
    ratio_alarms = best["alarms on"] / best["alarms off"]
    ratio_ensemble = best["alarms on"] / best["ensemble k=2"]
    per_round_alarms = [a / b for a, b in zip(rounds["alarms on"], rounds["alarms off"])]
    # What the ensemble adds per reward over the single scorer (alarms on both), against what one more member's
    # encode and scan cost in the same round: <= 1 means it adds nothing beyond the (k - 1) extra encodes + scans.
    extra_over_member = [(1 / e - 1 / s) / m for e, s, m in
                         zip(rounds["ensemble k=2"], rounds["alarms on"], encode_scan["alarms on"])]
    results = {"command": command(), "machine": machine(), "loadavg_end": os.getloadavg(),
               "corpus_size": len(index), "batch_size": args.batch_size, "rounds": rounds, "best": best,
               "encode_scan_s_per_reward": encode_scan,
               "alarms_on_over_off": ratio_alarms, "alarms_on_over_off_median": statistics.median(per_round_alarms),
               "ensemble_time_over_single": ratio_ensemble,
               "ensemble_extra_over_member_encode_scan": extra_over_member,
               "ensemble_extra_over_member_encode_scan_median": statistics.median(extra_over_member)}
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
    lines += ["", f"- alarms on / off throughput: {ratio_alarms:.3f} best of rounds, "
              f"{results['alarms_on_over_off_median']:.3f} median of the per-round ratios (target >= 0.95; the "
              "service-level figure is in `alarms-service-cpu.md`)",
              f"- ensemble of 2 / single scorer time per reward: {ratio_ensemble:.2f} (best of rounds)",
              f"- what the ensemble adds per reward over the single scorer, over the single scorer's own encode + "
              "scan time per reward (same round): median "
              f"{results['ensemble_extra_over_member_encode_scan_median']:.2f}"
              f" (every round: {', '.join(f'{x:.2f}' for x in extra_over_member)}; target <= 1 + noise: the "
              "k-th member costs one encode and one scan, nothing more)", ""]
    atomic_write_bytes(args.out.with_suffix(".md"), "\n".join(lines).encode("utf-8"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
