"""Benchmark the reward service on this machine's CPU, the way OpenRLHF and verl call it.

For each setup, in one run:

1. the ceiling: the same retriever and corpus scoring pre-formed batches in-process (no HTTP), batch sizes
   1, 16, 64 and 256;
2. ``grape-rewards serve`` in a subprocess with micro-batching on (``--max-batch-size 256``), loaded by
   ``loadgen.run_load`` with single-sample ``/get_reward`` requests at concurrency 1, 16, 64 and 256;
3. the same with micro-batching off (``--max-batch-size 1``);
4. single-query ``/retrieve`` requests (top 3) against both servers: searches go through the same batcher and
   queue as scoring (``--no-retrieve`` skips this part).

Setups: ``minilm``: the real all-MiniLM-L6-v2 text retriever over 50,000 synthetic captions (the index is
built once and cached); ``vit``: a random-init open_clip ViT-B-32 text tower over 50,000 random normalised
512-d image embeddings (the weights are random: only the speed means anything).

Every request's rewrite is distinct, so the embedding cache does not flatter the numbers. Results go to
``benchmarks/results/service-cpu.md`` and ``.json`` with the machine, versions, date and the command.

    python benchmarks/bench_service.py                      # both setups, ~12 min on 2 cores
    python benchmarks/bench_service.py --setups minilm --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a small shared machine, spinning torch threads starve the
# event loop, the load generator and each other (batch-1 scoring fell to ~2/s under load without it). It must
# be set before torch loads; the servers inherit it. Override with --omp-wait-policy or the variable itself.
if "--omp-wait-policy" in sys.argv[:-1]:
    os.environ["OMP_WAIT_POLICY"] = sys.argv[sys.argv.index("--omp-wait-policy") + 1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform
import re
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model
from loadgen import LoadResult, Workload, captions, run_load

from grape_rewards import __version__
from grape_rewards.corpus import CorpusIndex, CorpusSource, build_index
from grape_rewards.corpus.files import atomic_write_json, sha256_file
from grape_rewards.corpus.index import EMBEDDINGS, IDS, INDEX_FORMAT, INDEX_VERSION, MANIFEST
from grape_rewards.labels import parse_label
from grape_rewards.retrievers import Retriever, create_retriever
from grape_rewards.rewards import RewardConfig, response_from_query
from grape_rewards.scorer import RewardItem, RewardScorer
from grape_rewards.server.testing import free_port

ROOT = Path(__file__).resolve().parent
SETUPS = {
    "minilm": {"spec": "text:all-MiniLM-L6-v2", "title": "MiniLM text retriever, 50,000 captions"},
    "vit": {"spec": "random:open_clip:ViT-B-32", "title": "random-init ViT-B-32 text tower, 50,000 random image "
                                                          "embeddings"},
}


# -- corpora ------------------------------------------------------------------------------------------------
def minilm_index(retriever: Retriever, size: int, cache_dir: Path) -> tuple[Path, list[tuple[int, ...]]]:
    """The caption corpus embedded by MiniLM (built once, cached; the build is resumable)."""
    caps = captions(size)
    out = cache_dir / f"minilm-captions-{size}"
    manifest = out / MANIFEST
    if not (manifest.is_file() and json.loads(manifest.read_text())["retriever"]["fingerprint"]
            == retriever.fingerprint):
        print(f"building {out} ({size} captions; once)", flush=True)
        source = CorpusSource.from_records([(i, t) for i, t, _ in caps], "text", origin="bench captions")
        build_index(source, retriever, out, batch_size=256, overwrite=True, progress=True)
    return out, [c[2] for c in caps]


def random_image_index(retriever: Retriever, size: int, cache_dir: Path, seed: int = 0) -> Path:
    """A folder index of ``size`` random unit vectors whose manifest names ``retriever`` (no images needed)."""
    out = cache_dir / f"random-images-{size}-{retriever.dim}-{retriever.fingerprint[:16]}"
    if (out / MANIFEST).is_file():
        return out
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(size, retriever.dim, generator=gen), dim=-1).half()
    ids = [f"img{i:06d}" for i in range(size)]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": emb.contiguous()}, str(out / EMBEDDINGS))
    (out / IDS).write_text(json.dumps(ids), encoding="utf-8")
    atomic_write_json(out / MANIFEST, {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "retriever": retriever.describe(), "dim": retriever.dim,
        "count": size, "dtype": "float16", "modality": "image",
        "checksums": {EMBEDDINGS: sha256_file(out / EMBEDDINGS), IDS: sha256_file(out / IDS)},
        "source": {"origin": f"random normal, seed {seed}"}, "grape_rewards_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return out


# -- the ceiling ----------------------------------------------------------------------------------------------
def items_of(workload: Workload, start: int, n: int) -> list[RewardItem]:
    """The reward items the server would build from requests ``start .. start + n``."""
    out = []
    for i in range(start, start + n):
        query, prompt, label = workload.sample(i)
        lab = parse_label(label)
        out.append(RewardItem(completion=response_from_query(query, prompt), target_ids=lab.target_ids))
    return out


def measure_ceiling(scorer: RewardScorer, workload: Workload, batch_sizes: Sequence[int],
                    seconds: float) -> list[dict[str, float]]:
    """Rewards per second of ``scorer.score_batch`` on pre-formed batches of distinct rewrites."""
    rows = []
    next_i = 0
    for bs in batch_sizes:
        scorer.score_batch(items_of(workload, next_i, bs))  # warm-up
        next_i += bs
        budget = max(3, int(seconds * 500 / bs) + 1)  # pre-form enough batches; stop on time
        batches = [items_of(workload, next_i + k * bs, bs) for k in range(budget)]
        next_i += budget * bs
        done = 0
        t0 = time.perf_counter()
        for batch in batches:
            scorer.score_batch(batch)
            done += len(batch)
            if time.perf_counter() - t0 >= seconds and done >= 3 * bs:
                break
        elapsed = time.perf_counter() - t0
        rows.append({"batch_size": bs, "rewards_per_s": done / elapsed, "samples": done, "seconds": elapsed})
        print(f"  ceiling batch {bs:4d}: {done / elapsed:8.1f} rewards/s", flush=True)
    return rows


# -- the service --------------------------------------------------------------------------------------------
class ServerProcess:
    """``grape-rewards serve`` in a subprocess, ready on enter, drained with SIGTERM on exit."""

    def __init__(self, index: Path, spec: str, max_batch_size: int, log: Path, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "grape_rewards.cli", "serve", "--index", str(index), "--retriever", spec,
                    "--device", "cpu", "--port", str(self.port), "--max-batch-size", str(max_batch_size),
                    "--log-level", "warning", *extra]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in 300 s; see {self.log}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for name in ("grape_batch_items_sum", "grape_batch_items_count", "grape_queue_wait_seconds_sum",
                     "grape_queue_wait_seconds_count", "grape_batch_seconds_sum"):
            m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
            out[name] = float(m.group(1)) if m else 0.0
        m = re.search(r'^grape_cache_hits_total\{cache="embedding"\} ([0-9.e+-]+)$', text, re.M)
        out["cache_hits"] = float(m.group(1)) if m else 0.0
        return out

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


def load_point(server: ServerProcess, workload: Workload, concurrency: int, duration: float,
               warmup: float, path: str = "/get_reward") -> dict[str, Any]:
    """One load level against a running server, with the batch sizes it formed meanwhile (scoring only)."""
    before = server.metrics()
    t0 = time.perf_counter()
    make_body = workload.retrieve_body if path == "/retrieve" else workload.body
    result: LoadResult = asyncio.run(run_load(server.url + path, make_body, concurrency, duration,
                                              warmup_s=warmup))
    wall = time.perf_counter() - t0
    after = server.metrics()
    batches = after["grape_batch_items_count"] - before["grape_batch_items_count"]
    items = after["grape_batch_items_sum"] - before["grape_batch_items_sum"]
    row: dict[str, Any] = result.row()
    row["mean_batch"] = items / batches if batches else 0.0
    row["device_busy"] = (after["grape_batch_seconds_sum"] - before["grape_batch_seconds_sum"]) / wall
    row["cache_hits"] = after["cache_hits"] - before["cache_hits"]
    row["loadavg"] = os.getloadavg()[0]
    return row


def verify(server: ServerProcess, scorer: RewardScorer, workload: Workload, n: int = 32) -> float:
    """Largest |reward(service) - reward(in-process)| over ``n`` requests."""
    worst = 0.0
    for i in range(n):
        body = workload.body(i)
        req = urllib.request.Request(server.url + "/get_reward", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            remote = json.loads(r.read())["rewards"][0]
        local = scorer.score_batch(items_of(workload, i, 1)).samples[0]["reward"]
        worst = max(worst, abs(remote - local))
    return worst


# -- the report ---------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import fastapi
    import uvicorn

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT,
                                    check=False).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__, "grape_rewards": __version__,
        "git": commit + ("+dirty" if dirty else ""), "loadavg_start": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def write_report(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Reward service on the CPU: micro-batching vs none vs the in-process ceiling", "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['platform']}); load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in results['loadavg_end'])}",
        f"- versions: grape-rewards {m['grape_rewards']} (git {m['git']}), Python {m['python']}, torch {m['torch']}, "
        f"FastAPI {m['fastapi']}, uvicorn {m['uvicorn']}; OMP_WAIT_POLICY={m['omp_wait_policy']}",
        f"- load: single-sample OpenRLHF `/get_reward` requests (chat-templated query + prompt + JSON label), closed "
        f"loop, keep-alive connections, {results['duration_s']} s measured after {results['warmup_s']} s warm-up "
        "per point (times concurrency/64 above 64); rewrites never repeat by design (paraphrase templates collide "
        "rarely: the cache hits are counted below); client and server share the machine",
        "- rewards/s: answers after the first burst of the window over the time from the first burst to the last "
        "(a batch answers its requests together; a plain count per window is off by up to one batch)",
        f"- each point: best of {results.get('rounds', 1)} rounds, interleaved (ceiling, on, off for every "
        "concurrency, then again); the machine is shared with other work, see the load averages per round",
        "- ceiling: `RewardScorer.score_batch` on pre-formed batches of the same items, in-process, no HTTP", "",
    ]
    for setup in results["setups"].values():
        ceiling = {r["batch_size"]: r["rewards_per_s"] for r in setup["ceiling"]}
        lines += [f"## {setup['title']}", "",
                  f"retriever `{setup['spec']}`, corpus {setup['corpus_size']:,}, index `{setup['index']}`; "
                  f"service vs in-process rewards: max |difference| {setup['verify_max_abs_diff']:.2e}", "",
                  "| concurrency | batching on: rewards/s | p50 ms | p99 ms | mean batch | batching off: rewards/s "
                  "| p50 ms | p99 ms | ceiling (batch = concurrency) rewards/s | on / ceiling | on / off |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        on = {r["concurrency"]: r for r in setup["service"]["on"]}
        off = {r["concurrency"]: r for r in setup["service"]["off"]}
        for c in results["concurrency"]:
            a, b = on.get(c), off.get(c)
            ceil = ceiling.get(c, max(ceiling.values()))
            lines.append(
                f"| {c} | {_fmt(a['rps'])} | {_fmt(a['p50_ms'])} | {_fmt(a['p99_ms'])} | {_fmt(a['mean_batch'])} | "
                f"{_fmt(b['rps']) if b else '-'} | {_fmt(b['p50_ms']) if b else '-'} | "
                f"{_fmt(b['p99_ms']) if b else '-'} | {_fmt(ceil)} | {a['rps'] / ceil:.0%} | "
                f"{a['rps'] / b['rps']:.1f}x |" if a and b else f"| {c} | - |")
        retrieve = setup.get("retrieve") or {}
        if retrieve.get("on"):
            r_on = {r["concurrency"]: r for r in retrieve["on"]}
            r_off = {r["concurrency"]: r for r in retrieve.get("off", [])}
            lines += ["", "`/retrieve`, single-query requests (top 3), through the batcher (batching on) or one "
                      "search per request (batching off):", "",
                      "| concurrency | on: requests/s | p50 ms | p99 ms | off: requests/s | p50 ms | p99 ms "
                      "| on / off |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for c, a in r_on.items():
                b = r_off.get(c)
                lines.append(f"| {c} | {_fmt(a['rps'])} | {_fmt(a['p50_ms'])} | {_fmt(a['p99_ms'])} | "
                             + (f"{_fmt(b['rps'])} | {_fmt(b['p50_ms'])} | {_fmt(b['p99_ms'])} | "
                                f"{a['rps'] / b['rps']:.1f}x |" if b else "- | - | - | - |"))
        lines += ["", "In-process ceiling by batch size: " + ", ".join(
            f"{bs}: {_fmt(v)}/s" for bs, v in ceiling.items()) + "", ""]
        rounds = setup["all_rounds"]
        errors = sum(r["errors"] for mode in ("on", "off") for rows in rounds["service"][mode].values() for r in rows)
        hits = sum(r["cache_hits"] for mode in ("on", "off") for rows in rounds["service"][mode].values() for r in rows)
        lines += [f"Errors (non-200 or connection) over all rounds: {errors}; embedding-cache hits: {hits:.0f}.", "",
                  "<details><summary>every round (rewards/s; load average when measured)</summary>", "",
                  "| concurrency | round | ceiling | batching on | batching off | load |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for c in results["concurrency"]:
            for r, ceil in enumerate(rounds["ceiling"][c]):
                a, b = rounds["service"]["on"][c][r], rounds["service"]["off"][c][r]
                lines.append(f"| {c} | {r + 1} | {_fmt(ceil['rewards_per_s'])} | {_fmt(a['rps'])} | {_fmt(b['rps'])} | "
                             f"{a['loadavg']:.2f} |")
        lines += ["", "</details>", ""]
    lines += ["## Targets", ""]
    for check in results["targets"]:
        verdict = "INFO" if check["pass"] is None else "PASS" if check["pass"] else "MISS"
        lines.append(f"- {verdict}: {check['what']}: {check['value']}")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for name, setup in results["setups"].items():
        ceiling = {r["batch_size"]: r["rewards_per_s"] for r in setup["ceiling"]}
        on = {r["concurrency"]: r["rps"] for r in setup["service"]["on"]}
        off = {r["concurrency"]: r["rps"] for r in setup["service"]["off"]}
        if 64 in on:
            ref = ceiling.get(64, max(ceiling.values()))
            checks.append({"what": f"{name}: c=64 batching on >= 85% of the in-process ceiling (batch 64)",
                           "value": f"{on[64]:.1f} / {ref:.1f} = {on[64] / ref:.0%}", "pass": on[64] >= 0.85 * ref})
            best_bs = max(ceiling, key=lambda bs: ceiling[bs])
            checks.append({"what": f"{name}: (for information) c=64 batching on vs the best in-process batch of any "
                                   f"size (batch {best_bs}, not necessarily measured in the same conditions)",
                           "value": f"{on[64]:.1f} / {ceiling[best_bs]:.1f} = {on[64] / ceiling[best_bs]:.0%}",
                           "pass": None})
        if name == "minilm" and 64 in on and 64 in off:
            bound = f" (in-process batch 64 vs batch 1: {ceiling[64] / ceiling[1]:.1f}x)" if 1 in ceiling else ""
            checks.append({"what": "minilm: c=64 batching on >= 5x off", "value": f"{on[64] / off[64]:.1f}x{bound}",
                           "pass": on[64] >= 5 * off[64]})
        if 1 in on and 1 in off:
            checks.append({"what": f"{name}: c=1 batching on no slower than off (within 5% noise)",
                           "value": f"{on[1]:.1f} vs {off[1]:.1f} rewards/s", "pass": on[1] >= 0.95 * off[1]})
    return checks


def best(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round with the highest ``key`` (the least disturbed by other work on a shared machine)."""
    return max(rows, key=lambda r: r[key])


def run_setup(name: str, args: argparse.Namespace, extra: Sequence[str]) -> dict[str, Any]:
    """Ceiling, batching on and batching off for one setup, in ``--rounds`` rounds over every concurrency."""
    spec = SETUPS[name]["spec"]
    print(f"== {name}: {SETUPS[name]['title']}", flush=True)
    retriever = create_retriever(spec, device="cpu")
    if name == "minilm":
        index_dir, slots = minilm_index(retriever, args.corpus_size, args.cache_dir)
    else:
        index_dir, slots = random_image_index(retriever, args.corpus_size, args.cache_dir), None
    index = CorpusIndex.load(index_dir, expected_fingerprint=retriever.fingerprint)
    scorer = RewardScorer(retriever, index, RewardConfig())
    slots = Workload(index.ids, slots).slots
    offsets = iter(range(1, 1_000_000))

    def fresh() -> Workload:  # texts no earlier measurement has seen
        return Workload(index.ids, slots, offset=next(offsets) * 10_000_000)

    ceiling_rows: dict[int, list[dict[str, Any]]] = {}
    service_rows: dict[str, dict[int, list[dict[str, Any]]]] = {"on": {}, "off": {}}
    retrieve_rows: dict[str, dict[int, list[dict[str, Any]]]] = {"on": {}, "off": {}}
    logs = {mode: args.cache_dir / f"serve-{name}-{mode}.log" for mode in ("on", "off")}
    with ServerProcess(index_dir, spec, args.max_batch_size, logs["on"], extra) as on, \
            ServerProcess(index_dir, spec, 1, logs["off"], extra) as off:
        verify_diff = verify(on, scorer, fresh())
        print(f"  service vs in-process rewards: max |difference| {verify_diff:.2e}", flush=True)
        for r in range(args.rounds):  # round-major: a quiet spell on a shared machine covers every point
            for c in args.concurrency:
                ceil = measure_ceiling(scorer, fresh(), [c], args.ceiling_seconds)[0]
                ceiling_rows.setdefault(c, []).append(ceil)
                # Above 64 in flight a batch takes seconds: keep several batch cycles in the window.
                scale = max(1.0, c / 64)
                for mode, server in (("on", on), ("off", off)):
                    row = load_point(server, fresh(), c, args.duration * scale, args.warmup * scale)
                    service_rows[mode].setdefault(c, []).append(row)
                    print(f"  round {r + 1} c={c:4d} batching {mode:3s}: {row['rps']:8.1f} rewards/s  "
                          f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  mean batch "
                          f"{row['mean_batch']:6.1f}  errors {row['errors']}  (load {row['loadavg']:.2f})", flush=True)
                    if args.retrieve:
                        row = load_point(server, fresh(), c, args.duration * scale, args.warmup * scale, "/retrieve")
                        retrieve_rows[mode].setdefault(c, []).append(row)
                        print(f"  round {r + 1} c={c:4d} /retrieve {mode:3s}: {row['rps']:8.1f} requests/s  "
                              f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  errors {row['errors']}",
                              flush=True)
    return {
        "title": SETUPS[name]["title"], "spec": spec, "corpus_size": len(index), "index": str(index_dir),
        "rounds": args.rounds, "verify_max_abs_diff": verify_diff,
        "ceiling": [best(ceiling_rows[c], "rewards_per_s") for c in args.concurrency],
        "service": {mode: [best(rows[c], "rps") for c in args.concurrency] for mode, rows in service_rows.items()},
        "all_rounds": {"ceiling": ceiling_rows, "service": service_rows},
        "retrieve": {mode: [best(rows[c], "rps") for c in args.concurrency if c in rows]
                     for mode, rows in retrieve_rows.items()},
    }


def _load_results(path: Path) -> dict[str, Any]:
    """An earlier run's JSON, with the per-round tables keyed by int concurrency again."""
    results = json.loads(path.read_text())
    for setup in results["setups"].values():
        rounds = setup["all_rounds"]
        rounds["ceiling"] = {int(c): rows for c, rows in rounds["ceiling"].items()}
        rounds["service"] = {mode: {int(c): rows for c, rows in by_c.items()}
                             for mode, by_c in rounds["service"].items()}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    p.add_argument("--corpus-size", type=int, default=50_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--duration", type=float, default=5.0,
                   help="measured seconds per load point (times concurrency/64 above 64)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds before measuring, per load point (times concurrency/64 above 64)")
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per in-process measurement")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per point; the best is reported")
    p.add_argument("--max-batch-size", type=int, default=256, help="the service's batch limit with batching on")
    p.add_argument("--no-retrieve", dest="retrieve", action="store_false",
                   help="skip the /retrieve load points")
    p.add_argument("--serve-args", default="", help="extra flags for grape-rewards serve (both modes)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                   help="OMP_WAIT_POLICY of the benchmark and its servers (read before torch loads)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "grape-rewards-bench")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "service-cpu")
    p.add_argument("--report-only", type=Path, metavar="JSON",
                   help="rewrite the markdown report (and targets) of an earlier run's JSON; measure nothing")
    args = p.parse_args(argv)
    if args.report_only:
        results = _load_results(args.report_only)
        results["targets"] = targets(results)
        write_report(results, args.out)
        print(f"wrote {args.out.with_suffix('.md')}")
        return 0
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the servers get their SIGTERM too
    results: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "concurrency": args.concurrency, "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
        "setups": {}}
    extra = shlex.split(args.serve_args)
    for name in args.setups:
        results["setups"][name] = run_setup(name, args, extra)
    results["loadavg_end"] = os.getloadavg()
    results["targets"] = targets(results)
    write_report(results, args.out)
    for check in results["targets"]:
        verdict = "INFO" if check["pass"] is None else "PASS" if check["pass"] else "MISS"
        print(f"{verdict}: {check['what']}: {check['value']}")
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
