"""Benchmark the reward service under Ray Serve (replicas, shard actors) beside the single-process service.

The same corpus, load generator (``loadgen.run_load``: single-sample OpenRLHF ``/get_reward`` requests, closed
loop, every rewrite distinct) and server harness (``bench_service.ServerProcess``: ``grape-rewards serve`` in a
subprocess, drained with SIGTERM) as ``bench_service.py``; each setup is one ``grape-rewards serve`` command line:

- ``single``: ``grape-rewards serve`` (the baseline, measured again in the same run);
- ``ray-r1``: ``serve --ray --replicas 1`` (what Serve's proxy and router add);
- ``ray-r2``: ``serve --ray --replicas 2``;
- ``ray-r1-s2`` / ``ray-r2-s2``: the same over the corpus split in 2 shard actors (``index shard``, ``--shards 2``).

Before the load, 32 requests are checked against the in-process scorer (max |reward difference|, expected 0).
Results go to ``benchmarks/results/ray-<device>.md`` and ``.json``, beside ``service-cpu.*``.

    python benchmarks/bench_ray.py                               # all setups, CPU, ~8 min on 2 cores
    python benchmarks/bench_ray.py --setups single ray-r2-s2 --duration 5 --corpus-size 10000

On a GPU node pass ``--device cuda`` (replicas and shard actors then take one GPU each unless the per-setup
flags say otherwise). Thread counts on the CPU: the cores are split evenly between the replicas (and each shard
actor uses the same count), so that every setup uses the machine's cores and no more.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import re
import shlex
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ServerProcess, machine, minilm_index, verify
from loadgen import LoadResult, Workload, run_load

from grape_rewards.corpus import CorpusIndex
from grape_rewards.distributed import is_shard_set, shard_index
from grape_rewards.retrievers import create_retriever
from grape_rewards.rewards import RewardConfig
from grape_rewards.scorer import RewardScorer

ROOT = Path(__file__).resolve().parent
SPEC = "text:all-MiniLM-L6-v2"
SETUPS: dict[str, dict[str, int]] = {
    "single": {"replicas": 0, "shards": 0},
    "ray-r1": {"replicas": 1, "shards": 0},
    "ray-r2": {"replicas": 2, "shards": 0},
    "ray-r1-s2": {"replicas": 1, "shards": 2},
    "ray-r2-s2": {"replicas": 2, "shards": 2},
}


def serve_flags(setup: dict[str, int], cores: int, device: str) -> list[str]:
    """The ``grape-rewards serve`` flags of a setup (besides --index/--retriever/--port/--max-batch-size)."""
    replicas, shards = setup["replicas"], setup["shards"]
    if replicas == 0:
        return []
    flags = ["--ray", "--replicas", str(replicas)]
    if device == "cpu":
        threads = max(1, cores // replicas)
        # Ray resources: the replicas share the cores; shard actors are scheduled beside them (0 CPUs reserved)
        flags += ["--num-threads", str(threads), "--cpus-per-replica", str(cores / replicas),
                  "--gpus-per-replica", "0"]
        if shards:
            flags += ["--shards", str(shards), "--cpus-per-shard", "0", "--gpus-per-shard", "0"]
    elif shards:
        flags += ["--shards", str(shards)]
    return flags


def scrape(url: str) -> dict[str, float]:
    """Batch counters summed over every replica's series of ``/metrics``."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for name in ("grape_batch_items_sum", "grape_batch_items_count", "grape_batch_seconds_sum"):
        out[name] = sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))
    out["replicas"] = float(len(set(re.findall(r'^grape_ready\{replica="([^"]+)"\}', text, re.M))) or 1)
    return out


def load_point(url: str, workload: Workload, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    before = scrape(url)
    result: LoadResult = asyncio.run(run_load(url + "/get_reward", workload.body, concurrency, duration,
                                              warmup_s=warmup))
    time.sleep(2.5)  # the other replicas' metrics snapshots are pushed every 2 s
    after = scrape(url)
    batches = after["grape_batch_items_count"] - before["grape_batch_items_count"]
    items = after["grape_batch_items_sum"] - before["grape_batch_items_sum"]
    row = result.row()
    row["mean_batch"] = items / batches if batches else 0.0
    row["replicas_seen"] = after["replicas"]
    return row


def write_report(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        f"# Reward service under Ray Serve vs the single-process service ({results['device']})", "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['platform']}); load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in results['loadavg_end'])}",
        f"- versions: grape-rewards {m['grape_rewards']} (git {m['git']}), Python {m['python']}, torch {m['torch']}, "
        f"Ray {results['ray']}, FastAPI {m['fastapi']}, uvicorn {m['uvicorn']}; "
        f"OMP_WAIT_POLICY={m.get('omp_wait_policy')}, RAY_worker_niceness={results['ray_worker_niceness']}",
        f"- corpus: `{SPEC}` over {results['corpus_size']:,} synthetic captions; load: single-sample OpenRLHF "
        f"`/get_reward` requests from `benchmarks/loadgen.py` (closed loop, keep-alive, every rewrite distinct), "
        f"{results['duration_s']} s measured after {results['warmup_s']} s warm-up per point; client, proxy, "
        "replicas and shard actors share the machine",
        "- every service batches (max batch 256); `mean batch` is samples per device batch, over all replicas; "
        "`max |Δ reward|`: 32 requests checked against the in-process scorer", "",
        "| setup | command-line flags | concurrency | rewards/s | p50 ms | p99 ms | mean batch | errors | vs single |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    single = {r["concurrency"]: r["rps"] for r in results["setups"].get("single", {}).get("points", [])}
    for name, setup in results["setups"].items():
        for r in setup["points"]:
            ratio = f"{r['rps'] / single[r['concurrency']]:.2f}x" if single.get(r["concurrency"]) else "-"
            flags = " ".join(setup["flags"]) or "(none)"
            lines.append(f"| {name} | `{flags}` | {r['concurrency']} | {r['rps']:,.1f} | {r['p50_ms']:,.1f} | "
                         f"{r['p99_ms']:,.1f} | {r['mean_batch']:.1f} | {r['errors']} | {ratio} |")
    lines += ["", "| setup | ready after s | max abs reward difference vs in-process |", "|---|---:|---:|"]
    for name, setup in results["setups"].items():
        lines.append(f"| {name} | {setup['startup_s']:.1f} | {setup['verify_max_abs_diff']:.1e} |")
    lines += ["", results.get("notes", ""), ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    p.add_argument("--corpus-size", type=int, default=50_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per load point")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring, per load point")
    p.add_argument("--device", default="cpu", help="cpu or cuda (replicas and shard actors)")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--notes", default="", help="a paragraph added to the report")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "grape-rewards-bench")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/ray-<device>")
    args = p.parse_args(argv)
    # Ray starts its workers (proxy, replicas, shard actors) at nice 15; on a machine shared with the load
    # generator that would starve them. Same priority as the single-process server, for a fair comparison.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or ROOT / "results" / f"ray-{args.device.split(':')[0]}"
    retriever = create_retriever(SPEC, device="cpu")
    index_dir, slots = minilm_index(retriever, args.corpus_size, args.cache_dir)
    shards_dir = args.cache_dir / f"{index_dir.name}-shards-2"
    if any(SETUPS[s]["shards"] for s in args.setups) and not is_shard_set(shards_dir):
        shard_index(index_dir, shards_dir, 2, overwrite=True)
    index = CorpusIndex.load(index_dir, expected_fingerprint=retriever.fingerprint)
    scorer = RewardScorer(retriever, index, RewardConfig())
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "ray": ray.__version__, "device": args.device, "corpus_size": len(index), "concurrency": args.concurrency,
        "duration_s": args.duration, "warmup_s": args.warmup, "setups": {}, "notes": args.notes,
        "ray_worker_niceness": os.environ["RAY_worker_niceness"]}
    for k, name in enumerate(args.setups):
        setup = SETUPS[name]
        flags = serve_flags(setup, cores, args.device)
        served = shards_dir if setup["shards"] else index_dir
        extra = ["--device", args.device, *flags]
        print(f"== {name}: grape-rewards serve {' '.join(extra)}", flush=True)
        started = time.perf_counter()
        with ServerProcess(served, SPEC, args.max_batch_size, args.cache_dir / f"serve-ray-{name}.log",
                           extra) as server:
            startup = time.perf_counter() - started
            diff = verify(server, scorer, Workload(index.ids, slots, offset=700_000_000 + k * 1_000_000))
            points = []
            for j, c in enumerate(args.concurrency):
                workload = Workload(index.ids, slots, offset=(k + 1) * 100_000_000 + (j + 1) * 10_000_000)
                row = load_point(server.url, workload, c, args.duration, args.warmup)
                points.append(row)
                print(f"  c={c:4d}: {row['rps']:8.1f} rewards/s  p50 {row['p50_ms']:8.1f} ms  "
                      f"p99 {row['p99_ms']:8.1f} ms  mean batch {row['mean_batch']:6.1f}  errors {row['errors']}",
                      flush=True)
        results["setups"][name] = {"flags": flags, "startup_s": startup, "verify_max_abs_diff": diff,
                                   "points": points}
    results["loadavg_end"] = os.getloadavg()
    write_report(results, out)
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
