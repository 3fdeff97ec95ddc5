"""The service's own cost per request, with the retriever taken out: what bounds one process on a fast GPU.

A GPU encodes and ranks a batch in a few milliseconds, so through the service the Python around it (HTTP, JSON,
parsing, batching, tokenizing, assembling answers) decides the rate. This benchmark serves a **null retriever**
(open_clip's real ViT-B-32 tokenizer, then random unit vectors: no model, NO semantics; for timing only) over
10,000 random items, loads it with 256 concurrent single-sample ``/get_reward`` clients (``loadgen.py`` in its
own process) and records rewards/s and the CPU each server thread spends per request, in interleaved rounds, for
the default service and with each of two shortcuts off: the GC tuning (``gc_tuning``) and the raw-ASGI POST routes
(``fast_routes``: FastAPI's routing instead), beside the HTTP floor (empty requests).

    python benchmarks/bench_http_path.py --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from common import write_result
from loadgen import run_in_subprocess

from grape_rewards.corpus import CorpusIndex
from grape_rewards.retrievers.base import Retriever, TextInfo
from grape_rewards.retrievers.clip_tokenizer import fast_clip_tokenizer
from grape_rewards.rewards import RewardConfig
from grape_rewards.scorer import RewardScorer
from grape_rewards.server import ServeConfig, create_app
from grape_rewards.server.testing import ServerThread


class NullRetriever(Retriever):
    """Tokenizes like open_clip's ViT-B-32, then returns random unit vectors: the cost of a retriever minus the
    model. Embeddings carry NO meaning; for measuring the service's own overhead only."""

    spec = "null:ViT-B-32-tokenizer"
    dim = 64
    device = torch.device("cpu")
    max_text_tokens = 77
    corpus_modality = "image"
    random_init = True

    def __init__(self) -> None:
        import open_clip

        self.fast_tokenizer = fast_clip_tokenizer(open_clip.get_tokenizer("ViT-B-32"))

    @property
    def fingerprint(self) -> str:
        return "random-init-null"

    def text_info(self, texts):  # type: ignore[no-untyped-def]
        return self.encode_texts_with_info(texts)[1]

    def encode_texts(self, texts, batch_size=256):  # type: ignore[no-untyped-def]
        return self.encode_texts_with_info(texts, batch_size)[0]

    def encode_texts_with_info(self, texts, batch_size=256):  # type: ignore[no-untyped-def]
        ids = self.fast_tokenizer.encode(texts)
        self.fast_tokenizer.pack(ids)
        emb = torch.nn.functional.normalize(torch.randn(len(ids), self.dim), dim=1)
        return emb, [TextInfo(len(x), len(x) > self.max_text_tokens) for x in ids]


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (Linux /proc)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t.name] = (int(fields[11]) + int(fields[12])) / tick
    return out


VARIANTS: dict[str, dict[str, bool]] = {"GC tuning off": {"gc_tuning": False}, "default": {},
                                        "fast routes off": {"fast_routes": False}}
"""Server settings measured, round by round: the default service and each shortcut turned off."""


def point(scorer: RewardScorer, ids_dir: Path, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One server (``VARIANTS[variant]``): the HTTP floor, then the scored load with per-thread CPU."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)  # Python's defaults; the server's startup tunes them when asked
    app = create_app(scorer, ServeConfig(index="<in-memory>", max_batch_size=1024, log_level="warning",
                                         **VARIANTS[variant]))
    with ServerThread(app) as server:
        floor = run_in_subprocess(server.url, ids_dir, args.concurrency, args.seconds, empty=True, quiet=True)
        before, t0 = thread_cpu(), time.perf_counter()
        scored = run_in_subprocess(server.url, ids_dir, args.concurrency, args.seconds, quiet=True)
        after, elapsed = thread_cpu(), time.perf_counter() - t0
    answered = scored["rps"] * elapsed  # requests over the whole load (warm-up and drain included), approximately
    loop = sum(after[k] - before.get(k, 0.0) for k in after if k.startswith("uvicorn"))
    device = sum(after[k] - before.get(k, 0.0) for k in after if k.startswith("grape-device"))
    return {"variant": variant, "rps": scored["rps"], "p50_ms": scored["p50_ms"], "p99_ms": scored["p99_ms"],
            "errors": scored["errors"], "loop_us_per_request": loop / answered * 1e6,
            "device_thread_us_per_request": device / answered * 1e6, "floor_rps": floor["rps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--corpus-size", type=int, default=10_000)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    retriever = NullRetriever()
    ids = [f"cap{i:06d}" for i in range(args.corpus_size)]
    emb = torch.nn.functional.normalize(torch.randn(len(ids), retriever.dim), dim=1)
    index = CorpusIndex(emb, ids, {"retriever": {"spec": retriever.spec, "fingerprint": retriever.fingerprint}})
    scorer = RewardScorer(retriever, index, RewardConfig())
    ids_dir = Path(tempfile.mkdtemp())
    (ids_dir / "ids.json").write_text(json.dumps(ids))
    rows = []
    for r in range(args.rounds):
        for variant in VARIANTS:
            rows.append({"round": r + 1, **point(scorer, ids_dir, variant, args)})
            print(json.dumps(rows[-1]), flush=True)
    best = {v: max((x for x in rows if x["variant"] == v), key=lambda x: x["rps"]) for v in VARIANTS}
    lines = ["# The service's own cost per request (null retriever: tokenizer + random vectors, NO semantics)\n",
             "{header}",
             f"{args.concurrency} concurrent single-sample `/get_reward` clients (load generator in its own process), "
             f"{args.corpus_size:,} random items, one server process; CPU per request from /proc, by thread.\n",
             "| round | server | rewards/s | p50 ms | p99 ms | event loop CPU us/request | device thread CPU "
             "us/request | HTTP floor (empty requests)/s |", "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['round']} | {x['variant']} | {x['rps']:.0f} | {x['p50_ms']:.1f} | "
                     f"{x['p99_ms']:.1f} | {x['loop_us_per_request']:.0f} | {x['device_thread_us_per_request']:.0f} | "
                     f"{x['floor_rps']:.0f} |")
    default = best["default"]["rps"]
    lines.append("\nBest of each, what each shortcut buys (default over the shortcut off): " + "; ".join(
        f"{v.replace(' off', '')}: {default:.0f} vs {best[v]['rps']:.0f} rewards/s = {default / best[v]['rps']:.2f}x"
        for v in VARIANTS if v != "default") + ".")
    markdown = "\n".join(lines) + "\n"
    write_result("http-path-cpu", {"rows": rows}, markdown)
    print(markdown.replace("{header}", ""))


if __name__ == "__main__":
    main()
