"""The reward service on Ray (local cluster, CPU, 2 workers): Serve replicas over shard actors.

One Serve app (2 replicas over 2 shard actors, the real MiniLM retriever, 400 captions) is started for the module
and compared with the single-process service on the same requests; a shard actor is killed mid-load; the load
generator of the service benchmark runs through Serve. Ray and Serve are shut down at the end of the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from grape_rewards.corpus import CorpusIndex, CorpusSource, build_index  # noqa: E402
from grape_rewards.distributed import ShardedIndex, ShardUnavailable, load_sharded_scorer, shard_index  # noqa: E402
from grape_rewards.distributed.ray_serve import RayService, add_shard_error_handlers, serve_with_ray  # noqa: E402
from grape_rewards.distributed.ray_shards import RayShards  # noqa: E402
from grape_rewards.labels import parse_label  # noqa: E402
from grape_rewards.retrievers import TextEmbedder  # noqa: E402
from grape_rewards.rewards import RewardConfig, response_from_query  # noqa: E402
from grape_rewards.scorer import RewardItem, RewardScorer  # noqa: E402
from grape_rewards.server import ServeConfig, create_app  # noqa: E402
from grape_rewards.server.testing import ServerThread, free_port  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loadgen import Workload, captions, run_load  # noqa: E402

pytestmark = pytest.mark.slow
CORPUS_SIZE = 400
SERVE_LIMITS = {"max_batch_size": 64, "max_items_per_request": 64}


# -- fixtures ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local Ray with 2 CPUs for the module; Serve and Ray are shut down (no stray processes) at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="grape_rewards_tests")
    try:
        yield ray
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def index_dir(minilm: TextEmbedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The load generator's synthetic captions (ids cap000000...) embedded by MiniLM."""
    out = tmp_path_factory.mktemp("ray_index") / "captions"
    source = CorpusSource.from_records([(i, t) for i, t, _ in captions(CORPUS_SIZE)], "text", origin="test captions")
    build_index(source, minilm, out, batch_size=128, progress=False)
    return out


@pytest.fixture(scope="module")
def shards_dir(index_dir: Path) -> Path:
    out = index_dir.parent / "shards"
    shard_index(index_dir, out, 2)
    return out


@pytest.fixture(scope="module")
def reference(minilm: TextEmbedder, index_dir: Path) -> RewardScorer:
    """The single-process scorer over the whole index."""
    return RewardScorer(minilm, CorpusIndex.load(index_dir, expected_fingerprint=minilm.fingerprint), RewardConfig())


@pytest.fixture(scope="module")
def single(minilm: TextEmbedder, index_dir: Path) -> Iterator[ServerThread]:
    """The single-process service (the baseline the Ray service must match), with caches of its own: a text
    encoded alone and one encoded in a padded batch may differ in the last bit, so both services must see the
    same requests in the same order to be compared bit for bit."""
    scorer = RewardScorer(minilm, CorpusIndex.load(index_dir), RewardConfig())
    with ServerThread(create_app(scorer, ServeConfig(index=str(index_dir), **SERVE_LIMITS))) as running:
        yield running


@pytest.fixture(scope="module")
def service(ray_cluster: Any, shards_dir: Path) -> Iterator[RayService]:
    """2 Serve replicas over 2 shard actors (half a CPU each: 2 CPUs in all).

    Replicas and shard actors use as many torch threads as this process (Ray gives an actor with half a CPU one):
    a CPU matmul's float sums depend on its thread count, and the statistics must be bit-identical to the
    single-process service's.
    """
    config = ServeConfig(index=str(shards_dir), port=free_port(), device="cpu", num_threads=torch.get_num_threads(),
                         **SERVE_LIMITS)
    started = time.perf_counter()
    running = serve_with_ray(config, replicas=2, num_shards=2, cpus_per_replica=0.5, cpus_per_shard=0.5,
                             shard_timeout_s=60.0, blocking=False)
    assert isinstance(running, RayService)
    print(f"Serve app (2 replicas, 2 shards) ready in {time.perf_counter() - started:.1f} s")
    try:
        yield running
    finally:
        running.shutdown()


def native_items(ids: list[str]) -> list[dict[str, Any]]:
    """Single and multi-target items, exclusions on both shards, a target also excluded, an original query."""
    return [
        {"rewrite": "a young dog in red chases a kite in a sunny park at dawn", "target_ids": [ids[3]]},
        {"rewrite": "a cyclist repairs a bicycle", "target_ids": [ids[10], ids[390]], "excluded_ids": [ids[250]]},
        {"rewrite": "a surfer on a sandy beach", "target_ids": [ids[205]],
         "excluded_ids": [ids[205], ids[1], ids[399], ids[200]], "original_query": "surfer"},
        {"completion": "<answer></answer>", "target_ids": [ids[5], ids[300]]},
        {"completion": "<think>x</think><answer>a chef holds a loaf of bread inside a bakery</answer>",
         "target_ids": [ids[199], ids[200], ids[201]], "excluded_ids": [ids[198], ids[202]]},
        {"rewrite": "photo of a goat", "target_ids": [ids[0]], "excluded_ids": [ids[i] for i in range(1, 400, 7)]},
    ]


# -- the command line (its own local Ray, in a subprocess; runs before the module's cluster starts) --------------------
def test_cli_serve_ray_answers_then_sigterm_leaves_no_process(shards_dir: Path, reference: RewardScorer,
                                                             tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "grape_rewards.cli", "serve", "--ray", "--index", str(shards_dir), "--shards", "2",
         "--replicas", "1", "--cpus-per-replica", "0.5", "--cpus-per-shard", "0.5", "--device", "cpu",
         "--port", str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in 150 s"
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        item = {"rewrite": "a surfer on a sandy beach", "target_ids": ["cap000007", "cap000300"],
                "excluded_ids": ["cap000100"]}
        got = httpx.post(url + "/v1/rewards", json={"items": [item]}, timeout=60).json()["results"][0]
        want = reference.score([RewardItem(**item)])[0]
        assert got["rank"] == want["rank"] and got["n"] == want["n"] and got["reward"] == want["reward"]
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert descendants  # the local Ray: GCS, raylet, workers
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(90)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"


# -- identical rewards -------------------------------------------------------------------------------------------------
def test_two_replicas_two_shards_identical_to_single_process(service: RayService, single: ServerThread,
                                                             index_dir: Path) -> None:
    ids = json.loads((index_dir / "ids.json").read_text())
    items = native_items(ids)
    workload = Workload(ids)
    with httpx.Client(base_url=service.url, timeout=120) as ray_http, \
            httpx.Client(base_url=single.url, timeout=120) as one:
        for _ in range(4):  # several times: both replicas answer (Serve routes by queue length)
            got = ray_http.post("/v1/rewards", json={"items": items})
            want = one.post("/v1/rewards", json={"items": items})
            assert got.status_code == want.status_code == 200, got.text
            assert got.json() == want.json()
        bodies = [json.loads(workload.body(i)) for i in range(8)]
        batch = {"query": [b["query"][0] for b in bodies], "prompts": [b["prompts"][0] for b in bodies],
                 "labels": [json.dumps({"target_ids": [ids[i * 50], ids[i * 50 + 25]], "excluded_ids": [ids[399 - i]]})
                            for i in range(8)]}
        got, want = ray_http.post("/get_reward", json=batch), one.post("/get_reward", json=batch)
        assert got.status_code == want.status_code == 200 and got.json() == want.json()
        assert len(set(got.json()["extra_logs"]["rank"])) > 2  # not a trivial problem

        query = {"queries": ["a dog in a park", "a boat at the harbour", "a chef in a bakery"], "topk": 7,
                 "return_scores": True}
        got, want = ray_http.post("/retrieve", json=query), one.post("/retrieve", json=query)
        assert got.status_code == want.status_code == 200
        # The shards' merged top-k is the whole index's, each document with its text, read from its shard's actor.
        assert got.json() == want.json() and got.json()["contents_kind"] == "text"
        texts = {i: t for i, t, _ in captions(CORPUS_SIZE)}
        documents = [d["document"] for row in got.json()["result"] for d in row]
        assert all(d["contents"] == texts[d["id"]] for d in documents)
        assert {int(d["id"][3:]) < CORPUS_SIZE // 2 for d in documents} == {True, False}  # from both shards

        bad = {"items": [{"rewrite": "x", "target_ids": ["cap999999"]}]}
        got, want = ray_http.post("/v1/rewards", json=bad), one.post("/v1/rewards", json=bad)
        assert got.status_code == want.status_code == 422 and "cap999999" in got.json()["detail"]

        info = ray_http.get("/info").json()
        assert info["index"]["corpus_size"] == CORPUS_SIZE and info["index"]["device"] == "cpu"
        assert ray_http.get("/ready").status_code == 200


def _metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def test_metrics_cover_every_replica(service: RayService) -> None:
    with httpx.Client(base_url=service.url, timeout=60) as http:
        # Other replicas' series are snapshots pushed every 2 s: the replica that scored may not have pushed yet when
        # another one answers /metrics (a fast machine can finish all earlier scoring inside one push interval).
        deadline = time.monotonic() + 30
        replicas: set[str] = set()
        samples = 0.0
        while time.monotonic() < deadline and (len(replicas) < 2 or samples < 1):
            scored = http.post("/v1/rewards", json={"items": [{"rewrite": "a dog", "target_ids": ["cap000001"]}]})
            assert scored.status_code == 200, scored.text
            text = http.get("/metrics").text
            replicas = set(re.findall(r'^grape_ready\{replica="([^"]+)"\} 1\.0$', text, re.M))
            samples = _metric_sum(text, "grape_samples_total")
            time.sleep(0.5)
        assert len(replicas) == 2, text[:2000]
        assert samples >= 1, text[:4000]
        own = http.get("/metrics", params={"scope": "replica"}).text
        assert "replica=" not in own and re.search(r"^grape_ready 1\.0$", own, re.M)


# -- failures ----------------------------------------------------------------------------------------------------------
def _expected_rewards(reference: RewardScorer, workload: Workload, numbers: list[int]) -> dict[int, float]:
    items = []
    for i in numbers:
        query, prompt, label = workload.sample(i)
        items.append(RewardItem(completion=response_from_query(query, prompt),
                                target_ids=parse_label(label).target_ids))
    samples = reference.score(items)
    return {i: s["reward"] for i, s in zip(numbers, samples)}


def test_killing_a_shard_actor_mid_load_retries_and_never_answers_a_partial_rank(
        service: RayService, reference: RewardScorer, index_dir: Path) -> None:
    ids = json.loads((index_dir / "ids.json").read_text())
    workload = Workload(ids, offset=1_000_000)
    answers: dict[int, bytes] = {}
    assert service.shards is not None
    old_pids = service.shards.pids()
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(2.0)
        os.kill(old_pids[1], signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill)
    killer.start()
    result = asyncio.run(run_load(service.url + "/get_reward", workload.body, concurrency=8, duration_s=9.0,
                                  warmup_s=0.5, check=lambda i, body: answers.__setitem__(i, body),
                                  min_answers=21))  # a number of answers, however busy the machine
    killer.join()
    new_pids = service.shards.pids()
    print(f"kill test: {result.requests} requests, {result.rps:.1f}/s, p50 {result.p50_ms:.0f} ms, "
          f"p99 {result.p99_ms:.0f} ms, statuses {result.statuses}")
    assert new_pids[1] != old_pids[1] and new_pids[0] == old_pids[0]  # Ray restarted the killed shard only
    assert result.errors == 0 and set(result.statuses) == {"200"}
    assert result.requests > 20 and len(answers) >= result.requests
    expected = _expected_rewards(reference, workload, sorted(answers))
    wrong = {i: (json.loads(body)["rewards"][0], expected[i]) for i, body in answers.items()
             if json.loads(body)["rewards"][0] != expected[i]}
    assert not wrong, f"{len(wrong)} answers differ from the single-process service: {list(wrong.items())[:5]}"


def _replica_pids() -> set[int]:
    """Process ids of this module's Serve replicas (descendants of this process: its local Ray)."""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::ServeReplica:grape-rewards:GrapeRewards"):
                pids.add(proc.pid)
        except psutil.Error:
            continue
    return pids


def test_a_replica_that_dies_is_replaced_and_retried_requests_succeed(service: RayService, reference: RewardScorer,
                                                                      index_dir: Path) -> None:
    """Serve answers the requests a dying replica held with 500; a client that retries (as OpenRLHF's does) gets
    every reward right, and Serve starts a new replica."""
    pytest.importorskip("psutil")
    ids = json.loads((index_dir / "ids.json").read_text())
    workload = Workload(ids, offset=3_000_000)
    deadline = time.monotonic() + 60  # on a loaded machine a replica can be ready before its process title is set
    while len(before := _replica_pids()) != 2:
        assert time.monotonic() < deadline, f"expected 2 Serve replicas among this process' children, saw {before}"
        time.sleep(1)
    victim = min(before)
    answers: dict[int, float] = {}
    retried: list[int] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        deadline = time.monotonic() + 90
        while True:
            try:
                r = await client.post("/get_reward", content=workload.body(i),
                                      headers={"Content-Type": "application/json"})
                if r.status_code == 200:
                    answers[i] = r.json()["rewards"][0]
                    return
                assert r.status_code in (500, 502, 503, 504), r.text
            except httpx.TransportError:
                pass
            retried.append(i)
            assert time.monotonic() < deadline, f"request {i} kept failing"
            await asyncio.sleep(0.5)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            pending = [asyncio.create_task(one(client, i)) for i in range(16)]
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGKILL)
            pending += [asyncio.create_task(one(client, i)) for i in range(16, 48)]
            await asyncio.gather(*pending)

    asyncio.run(run())
    expected = _expected_rewards(reference, workload, sorted(answers))
    wrong = {i: (answers[i], expected[i]) for i in answers if answers[i] != expected[i]}
    assert not wrong and len(answers) == 48, f"{len(answers)} answers; (service, in-process) where they differ: {wrong}"
    deadline = time.monotonic() + 90
    while True:
        after = _replica_pids()
        if len(after) == 2 and victim not in after:
            break
        assert time.monotonic() < deadline, f"Serve did not replace the replica: {before} -> {after}"
        time.sleep(1)
    with httpx.Client(base_url=service.url, timeout=60) as http:
        deadline = time.monotonic() + 90
        while http.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(1)
    print(f"replica {victim} killed: {len(set(retried))} requests retried, replicas now {sorted(after)}")


def test_a_shard_down_for_good_is_a_503_never_a_smaller_corpus(ray_cluster: Any, minilm: TextEmbedder,
                                                               shards_dir: Path, reference: RewardScorer) -> None:
    backend = RayShards.launch(shards_dir, num_cpus=0, cooldown_s=3.0)
    backend.timeout_s = 4.0  # once loaded: a shard that does not answer within 4 s is down
    scorer = load_sharded_scorer(ServeConfig(index=str(shards_dir), device="cpu"), backend=backend)
    assert isinstance(scorer.index, ShardedIndex)
    item = RewardItem(rewrite="a dog", target_ids=["cap000001", "cap000300"])
    assert scorer.score([item]) == reference.score([item])
    app = create_app(scorer, ServeConfig(index=str(shards_dir), retry_after_s=1))
    add_shard_error_handlers(app, 1)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        ray.kill(backend.actors[0], no_restart=True)
        started = time.monotonic()
        r = http.post("/v1/rewards", json={"items": [{"rewrite": "a cat", "target_ids": ["cap000002"]}]})
        assert r.status_code == 503 and "shard 0 of 2" in r.json()["detail"], r.text
        assert int(r.headers["retry-after"]) >= 1 and time.monotonic() - started < 30
        started = time.monotonic()  # within the cooldown: fails fast
        r = http.post("/v1/rewards", json={"items": [{"rewrite": "a cow", "target_ids": ["cap000003"]}]})
        assert r.status_code == 503 and time.monotonic() - started < 2
    with pytest.raises(ShardUnavailable):
        scorer.index.rank(torch.zeros(1, scorer.index.dim), [["cap000001"]])
    backend.close()


# -- load through Serve ------------------------------------------------------------------------------------------------
def test_load_through_serve_with_the_benchmark_load_generator(service: RayService, reference: RewardScorer,
                                                              index_dir: Path) -> None:
    ids = json.loads((index_dir / "ids.json").read_text())
    workload = Workload(ids, offset=2_000_000)
    with httpx.Client(base_url=service.url, timeout=60) as http:
        before = http.get("/metrics").text
        result = asyncio.run(run_load(service.url + "/get_reward", workload.body, concurrency=16, duration_s=4.0,
                                      warmup_s=0.5, min_answers=21))
        time.sleep(2.5)  # one push interval: the other replica's snapshot is fresh
        after = http.get("/metrics").text
    batches = _metric_sum(after, "grape_batch_items_count") - _metric_sum(before, "grape_batch_items_count")
    items = _metric_sum(after, "grape_batch_items_sum") - _metric_sum(before, "grape_batch_items_sum")
    print(f"load through Serve: {result.rps:.1f} rewards/s, p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms, "
          f"mean batch {items / max(batches, 1):.1f}")
    assert result.errors == 0 and result.requests > 20
    assert items / max(batches, 1) > 1.5  # micro-batching works per replica
