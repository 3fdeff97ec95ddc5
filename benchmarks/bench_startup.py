"""Time to ready of ``grape-rewards serve``: from the process start until ``/ready`` answers 200.

The service behind a training run is restarted more often than it is tuned (a crash, a new index, a node moved),
and the clients' retry budget has to outlast one restart, so the time to ready is worth cutting. Measured on the
packaged all-MiniLM-L6-v2 over the 100 demo captions (the index is built once and cached), in interleaved rounds:

- ``this tree``: the checkout the benchmark runs from;
- ``baseline`` (``--baseline-tree DIR``, optional): another checkout's ``grape_rewards`` (e.g. ``git worktree add
  /tmp/base <commit>``), so that a change is measured against what it replaced in the same run;
- two import floors, each a fresh ``python -c``: ``import torch``, and ``torch`` + the BERT model class of
  transformers (which imports torchvision and torch._dynamo on the way): what any service of this model pays
  before its own code runs.

    python benchmarks/bench_startup.py --rounds 5 [--baseline-tree /tmp/base]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result

from grape_rewards.server.testing import free_port

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"import torch": "import torch",
          "import torch + transformers' BertModel": "import torch; from transformers import BertModel"}


def demo_index(cache: Path) -> Path:
    out = cache / "startup-demo-minilm"
    if not (out / "manifest.json").is_file():
        from grape_rewards.demo import data_path

        subprocess.run([sys.executable, "-m", "grape_rewards.cli", "index", "build", "--retriever",
                        "text:all-MiniLM-L6-v2", "--device", "cpu", "--source", str(data_path("captions.jsonl")),
                        "--out", str(out)], check=True, capture_output=True)
    return out


def time_to_ready(tree: Path, index: Path) -> float:
    """Seconds from spawning ``serve`` (with ``tree`` first on the path) to the first 200 from /ready."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "grape_rewards.cli", "serve", "--index", str(index), "--device",
                             "cpu", "--port", str(port), "--log-level", "warning"], env=env, cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve from {tree} exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(60)


def import_floor(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--baseline-tree", type=Path, help="a checkout whose grape_rewards is the baseline")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "grape-rewards-bench")
    args = p.parse_args()
    index = demo_index(args.cache_dir)
    setups = {"this tree": REPO, **({"baseline": args.baseline_tree.resolve()} if args.baseline_tree else {})}
    rows: dict[str, list[float]] = {name: [] for name in [*setups, *FLOORS]}
    for r in range(args.rounds):
        for name, tree in setups.items():
            rows[name].append(time_to_ready(tree, index))
        for name, code in FLOORS.items():
            rows[name].append(import_floor(code))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in rows.items()), flush=True)
    medians = {n: statistics.median(v) for n, v in rows.items()}
    lines = ["# Time to ready of `grape-rewards serve` (CPU)\n", "{header}",
             f"MiniLM over the 100 demo captions, `--device cpu`; {args.rounds} interleaved rounds; seconds from "
             f"spawning the process to the first 200 from `/ready`. Load average at the end: "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.\n",
             "| setup | median s | every round |", "|---|---:|---|"]
    lines += [f"| {n} | {medians[n]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |" for n, v in rows.items()]
    if "baseline" in medians:
        lines.append(f"\nThis tree / baseline: {medians['this tree'] / medians['baseline']:.2f} (median over rounds); "
                     f"baseline tree: `{setups['baseline']}`.")
    floor = medians["import torch + transformers' BertModel"]
    lines.append(f"\nThis tree minus the torch + transformers import floor: {medians['this tree'] - floor:+.2f} s "
                 "(Python start-up, the service's own imports, loading the model and index, building the app, "
                 "binding, warming up).")
    markdown = "\n".join(lines) + "\n"
    write_result("startup-cpu", {"rounds": rows, "medians": medians, "baseline_tree": str(args.baseline_tree or "")},
                 markdown)
    print(markdown.replace("{header}", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
