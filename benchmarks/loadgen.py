"""A load generator for the reward service: single-sample ``/get_reward`` requests, many in flight.

OpenRLHF and verl call the reward once per generated sample, with hundreds of calls in flight. This
generator runs ``concurrency`` closed-loop workers, each on its own keep-alive connection (or a new
connection per request, as OpenRLHF's aiohttp client does, with ``--new-connection``), and records the
latency of every request after a warm-up. It speaks minimal HTTP/1.1 over asyncio streams so that the
client's own CPU cost stays small next to the server's (both share the machine in a benchmark).

Library use (see ``bench_service.py``)::

    result = asyncio.run(run_load("http://127.0.0.1:8000/get_reward", make_body, concurrency=64, duration_s=10))

Command line, against a running ``grape-rewards serve`` over any index (rewrites are synthetic captions whose
targets are drawn from the index's ids)::

    python benchmarks/loadgen.py --url http://127.0.0.1:8000/get_reward --index DIR --concurrency 1 16 64 256
    python benchmarks/loadgen.py --url http://127.0.0.1:8000/get_reward --empty --concurrency 256  # HTTP floor
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    import orjson

    _dumps: Callable[[object], bytes] = orjson.dumps
except ImportError:  # pragma: no cover
    def _dumps(obj: object) -> bytes:
        return json.dumps(obj).encode()

PROMPT = ("<|im_start|>system\nYou rewrite image-search queries.<|im_end|>\n<|im_start|>user\n"
          "Rewrite this query so a CLIP retriever finds the photo: {query}<|im_end|>\n<|im_start|>assistant\n")

# -- synthetic captions (combinatorial templates: millions of distinct, plausible captions) -----------------
SUBJECTS = ["dog", "cat", "horse", "child", "woman", "man", "cyclist", "surfer", "skier", "chef", "farmer",
            "runner", "guitarist", "painter", "fisherman", "baker", "student", "dancer", "climber", "sailor",
            "puppy", "goat", "cow", "boy", "girl", "couple", "grandmother", "police officer", "firefighter", "nurse"]
ADJECTIVES = ["young", "old", "tall", "small", "happy", "tired", "smiling", "curious", "muddy", "sleepy", "busy",
              "calm"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "grey", "pink", "striped"]
VERBS = ["holds", "carries", "chases", "paints", "throws", "kicks", "repairs", "cleans", "sells", "watches",
         "photographs", "drops", "lifts", "pushes", "pulls", "feeds", "hugs", "inspects", "waves", "juggles"]
OBJECTS = ["a kite", "a ball", "a bicycle", "an umbrella", "a basket of apples", "a surfboard", "a guitar",
           "a wooden boat", "a bucket", "a loaf of bread", "a map", "a lantern", "a frisbee", "a suitcase",
           "a bunch of flowers", "a camera", "a ladder", "a paper bag", "a skateboard", "a fishing rod"]
PLACES = ["in a sunny park", "on a sandy beach", "in a busy market", "on a snowy mountain", "in a quiet library",
          "beside a river", "in a crowded subway", "on a farm", "in a small kitchen", "at a train station",
          "on a city rooftop", "in a flower garden", "under a bridge", "in a forest clearing", "at the harbour",
          "on a football pitch", "in a desert", "inside a bakery", "next to a fountain", "in an old church",
          "on a frozen lake", "in a vineyard", "at a night market", "on a country road", "in a classroom",
          "at a bus stop", "in a greenhouse", "on a wooden pier", "in a parking lot", "at a campsite"]
TIMES = ["at dawn", "at noon", "at sunset", "at night", "in the rain", "in the fog", "on a windy day",
         "in winter", "in autumn", "during a festival"]


def caption_slots(i: int, seed: int = 0) -> tuple[int, ...]:
    """The slot choices of caption ``i`` (deterministic; distinct ``i`` rarely collide, and callers dedupe)."""
    rng = random.Random(i * 1_000_003 + seed)
    return (rng.randrange(len(ADJECTIVES)), rng.randrange(len(COLOURS)), rng.randrange(len(SUBJECTS)),
            rng.randrange(len(VERBS)), rng.randrange(len(OBJECTS)), rng.randrange(len(PLACES)),
            rng.randrange(len(TIMES)))


def caption_text(slots: Sequence[int]) -> str:
    a, c, s, v, o, p, t = slots
    return f"A {ADJECTIVES[a]} {SUBJECTS[s]} in {COLOURS[c]} {VERBS[v]} {OBJECTS[o]} {PLACES[p]} {TIMES[t]}."


def captions(n: int, seed: int = 0) -> list[tuple[str, str, tuple[int, ...]]]:
    """``n`` distinct synthetic captions as (id, text, slots); the same ``(n, seed)`` gives the same list."""
    out: list[tuple[str, str, tuple[int, ...]]] = []
    seen: set[tuple[int, ...]] = set()
    i = 0
    while len(out) < n:
        slots = caption_slots(i, seed)
        i += 1
        if slots in seen:
            continue
        seen.add(slots)
        out.append((f"cap{len(out):06d}", caption_text(slots), slots))
    return out


_STYLES = ("{s} {c} {a} {v} {o} {p}", "{a} {s}, {c} clothes, {v} {o} {p} {t}", "photo of a {s} that {v} {o} {t}",
           "{p}: a {c} {s} {v} {o}", "{s} {v} {o}, {p}, {t}", "a {a} {s} with {o} {p}")


def rewrite_text(slots: Sequence[int], variant: int) -> str:
    """A paraphrase of the caption with these slots; ``variant`` picks the style and a distinguishing number."""
    a, c, s, v, o, p, t = slots
    style = _STYLES[variant % len(_STYLES)]
    text = style.format(a=ADJECTIVES[a], c=COLOURS[c], s=SUBJECTS[s], v=VERBS[v], o=OBJECTS[o], p=PLACES[p],
                        t=TIMES[t])
    n = variant // len(_STYLES)
    return text if n == 0 else f"{text}, shot {n}"


class Workload:
    """Single-sample OpenRLHF request bodies for a corpus of synthetic captions (or any ids).

    Request ``i`` targets corpus item ``i * 7919 % n`` with a paraphrase of its caption that no other request
    of the workload repeats (the embedding cache does not flatter the numbers); ``offset`` keeps runs disjoint.
    ``slots`` default to those of :func:`captions` (``len(ids)``, seed 0): the benchmark's caption corpus.
    """

    def __init__(self, ids: Sequence[str], slots: Sequence[Sequence[int]] | None = None, offset: int = 0) -> None:
        self.ids = list(ids)
        self.slots = list(slots) if slots is not None else [c[2] for c in captions(len(self.ids))]
        self.offset = offset

    def sample(self, i: int) -> tuple[str, str, str]:
        """(query, prompt, label) of request ``i``, as OpenRLHF would send them."""
        i += self.offset
        n = len(self.ids)
        j = (i * 7919) % n
        rewrite = rewrite_text(self.slots[j], i // n * 7 + i % 7)
        prompt = PROMPT.format(query=f"request {i}: " + caption_text(self.slots[j]).lower())
        query = prompt + f"<think>name the subject, the action and the place</think><answer>{rewrite}</answer>" \
                         "<|im_end|>"
        return query, prompt, json.dumps({"target_ids": [self.ids[j]]})

    def body(self, i: int) -> bytes:
        query, prompt, label = self.sample(i)
        return _dumps({"query": [query], "prompts": [prompt], "labels": [label]})

    def retrieve_body(self, i: int) -> bytes:
        """A single-query Search-R1 ``/retrieve`` request (top 3) with request ``i``'s rewrite."""
        i += self.offset
        n = len(self.ids)
        return _dumps({"queries": [rewrite_text(self.slots[(i * 7919) % n], i // n * 7 + i % 7)], "topk": 3})


EMPTY_BODY = _dumps({"query": [], "prompts": [], "labels": []})
"""A well-formed request with no samples: answered without scoring."""


# -- the load generator ------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """What one load point measured (latencies in milliseconds, after the warm-up)."""

    concurrency: int
    requests: int
    errors: int
    duration_s: float
    rps: float
    """Answers per second (:func:`burst_throughput` of the answers in the window)."""
    rps_window: float
    """Answers in the window / its length (quantised by whole batches)."""
    p50_ms: float
    p99_ms: float
    mean_ms: float
    statuses: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, float | int]:
        return asdict(self)


def burst_throughput(times: Sequence[float], window_s: float) -> float:
    """Answers per second from completion times, free of the quantisation that batched answers cause.

    A device batch answers its requests together, so a window holds a whole number of batches and a plain
    count/window is off by up to one batch. Here completions are cut into bursts (where the gap exceeds a
    quarter of the largest gap), and the rate is the answers from the first burst's start up to the last
    burst's start, over that time: whole batch cycles. For unbatched answers, whatever the cut, the count and
    the time span end at the same completion, so the rate is unbiased.

    >>> round(burst_throughput([0.0, 0.001, 1.0, 1.001, 2.0, 2.001], 2.5), 3)  # 2 answers per second
    2.0
    >>> round(burst_throughput([0.0, 0.1, 0.2, 0.3, 1.3, 1.4, 1.5], 2.0), 3)  # a stall: 4 answers in 1.3 s
    3.077
    """
    ts = sorted(times)
    if len(ts) < 3:
        return len(ts) / window_s
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    split = 0.25 * max(gaps)
    last_start = max(i + 1 for i, g in enumerate(gaps) if g > split)
    span = ts[last_start] - ts[0]
    return last_start / span if span > 0 else len(ts) / window_s


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    """
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def run_load(url: str, make_body: Callable[[int], bytes], concurrency: int, duration_s: float,
                   warmup_s: float = 1.0, token: str | None = None, new_connection: bool = False,
                   check: Callable[[int, bytes], None] | None = None, min_answers: int = 0,
                   max_extra_s: float = 120.0) -> LoadResult:
    """Run ``concurrency`` closed-loop workers against ``url``; measure the answers of a ``duration_s`` window.

    Workers send from the start; the answers that arrive in ``[warmup_s, warmup_s + duration_s]`` are
    counted (throughput) and their latencies kept (p50, p99). After the window no new request is sent and
    the ones in flight are awaited (so the next measurement starts on an empty server), not counted.

    Args:
        make_body: the JSON body of request number ``i`` (a distinct ``i`` per request).
        new_connection: open a new connection for every request (OpenRLHF's client does).
        check: called with (i, response body) of every 200 answer (e.g. to verify rewards).
        min_answers: keep the window open past ``duration_s`` until this many answers are counted (at most
            ``max_extra_s`` longer): a test asks for a number of answers, not for a speed, so a busy machine makes it
            slower, not red. The result's ``duration_s`` is then the window's real length.
    """
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    header = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
              "Content-Length: {n}\r\n" + ("Connection: close\r\n" if new_connection else "") + "\r\n")
    counter = 0
    latencies: list[float] = []
    done_at: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = measure_from + duration_s
    deadline = stop_at + max_extra_s

    def open_at(t: float) -> bool:
        """Whether the window is open at time ``t``: its planned length, or longer while answers are missing."""
        return t <= stop_at or (len(latencies) < min_answers and t <= deadline)

    async def worker() -> None:
        nonlocal counter, errors
        reader = writer = None
        while open_at(loop.time()):
            i = counter
            counter += 1
            body = make_body(i)
            t0 = loop.time()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                writer.write(header.format(n=len(body)).encode() + body)
                status, payload, close = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
                continue
            t1 = loop.time()
            if measure_from <= t1 and open_at(t1):
                latencies.append(t1 - t0)
                done_at.append(t1)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status != 200:
                    errors += 1
            if status == 200 and check is not None:
                check(i, payload)
            if close or new_connection:
                assert writer is not None
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    ok = latencies
    window = max(duration_s, (max(done_at) - measure_from) if done_at else 0.0)  # longer only with min_answers
    return LoadResult(
        concurrency=concurrency, requests=len(latencies), errors=errors, duration_s=window,
        rps=burst_throughput(done_at, window), rps_window=len(latencies) / window,
        p50_ms=percentile(ok, 0.5) * 1000, p99_ms=percentile(ok, 0.99) * 1000,
        mean_ms=statistics.fmean(ok) * 1000 if ok else float("nan"), statuses=statuses)


def run_in_subprocess(url: str, ids_dir: Path, concurrency: int, seconds: float, empty: bool = False,
                      quiet: bool = False) -> dict[str, Any]:
    """This load generator in its own process (its CPU is not the server's) against ``url`` (the service's base
    URL), targets from ``ids_dir/ids.json``; its one result row."""
    out = ids_dir / ("empty.json" if empty else "load.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--url", url + "/get_reward", "--index", str(ids_dir),
           "--concurrency", str(concurrency), "--duration", str(seconds), "--warmup", "2", "--json", str(out)]
    subprocess.run(cmd + (["--empty"] if empty else []), check=True, timeout=seconds + 120, capture_output=quiet)
    return json.loads(out.read_text())[0]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/get_reward")
    p.add_argument("--index", type=Path, help="the served index folder (its ids.json gives targets)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--new-connection", action="store_true", help="a new connection per request (as OpenRLHF)")
    p.add_argument("--token", default=os.environ.get("GRAPE_TOKEN"))
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--empty", action="store_true",
                   help="send empty requests (no samples): the service's HTTP and JSON floor, nothing scored")
    args = p.parse_args(argv)
    if args.index is None and not args.empty:
        p.error("--index is needed (its ids.json gives the targets), unless --empty")
    ids = json.loads((args.index / "ids.json").read_text(encoding="utf-8")) if args.index else ["unused"]
    rows = []
    offset = int(time.time()) % 1000 * 1_000_000  # fresh texts per invocation: no cache hits from a previous run
    for c in args.concurrency:
        workload = Workload(ids, offset=offset)
        offset += 10_000_000
        body = (lambda i: EMPTY_BODY) if args.empty else workload.body
        result = asyncio.run(run_load(args.url, body, c, args.duration, args.warmup, args.token,
                                      args.new_connection))
        rows.append(result.row())
        print(f"c={c:4d}  {result.rps:8.1f} rewards/s  p50 {result.p50_ms:8.1f} ms  p99 {result.p99_ms:8.1f} ms  "
              f"errors {result.errors}  {result.statuses}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
