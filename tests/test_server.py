"""The reward service end to end: real uvicorn on a free loopback port, the real MiniLM retriever.

Covers the OpenRLHF protocol (chat-templated and VLM-expanded queries), 500 concurrent single-sample
requests against the in-process scorer, a table of bad inputs followed by a healthy /ready, token auth,
the refusal to bind a public address without a token, config precedence, the micro-batcher's queue bound
and fault isolation, and a SIGTERM drain of a ``grape-rewards serve`` subprocess.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from grape_rewards.cli import main as cli_main
from grape_rewards.corpus import CorpusIndex, build_index, read_source
from grape_rewards.demo import data_path
from grape_rewards.retrievers import TextEmbedder
from grape_rewards.rewards import RewardConfig
from grape_rewards.scorer import RewardItem, RewardScorer, ScoredBatch
from grape_rewards.server import ServeConfig, create_app, load_config
from grape_rewards.server.batcher import MicroBatcher, QueueFull
from grape_rewards.server.config import ConfigError
from grape_rewards.server.rejections import RejectionLog
from grape_rewards.server.testing import ServerThread, free_port

QWEN_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "Rewrite for image search: 一只棕色的狗在公园里接飞盘<|im_end|>\n<|im_start|>assistant\n")
LLAMA_PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nRewrite: a dog thing<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
VLM_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Change the dog to a black one."
              "<|im_end|>\n<|im_start|>assistant\n")
VLM_EXPANDED = VLM_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * 256)  # what OpenRLHF decodes
LIMITS = {"max_body_bytes": 200_000, "max_items_per_request": 64, "max_topk": 50}


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_dir(minilm: TextEmbedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 100 demo captions embedded by MiniLM."""
    out = tmp_path_factory.mktemp("server_index") / "captions"
    build_index(read_source(data_path("captions.jsonl")), minilm, out, progress=False)
    return out


@pytest.fixture(scope="module")
def scorer(minilm: TextEmbedder, index_dir: Path) -> RewardScorer:
    index = CorpusIndex.load(index_dir, expected_fingerprint=minilm.fingerprint)
    return RewardScorer(minilm, index, RewardConfig())


@pytest.fixture(scope="module")
def reference(minilm: TextEmbedder, index_dir: Path) -> RewardScorer:
    """An independent in-process scorer (its own cache) to compare the service against."""
    return RewardScorer(minilm, CorpusIndex.load(index_dir), RewardConfig())


@pytest.fixture(scope="module")
def server(scorer: RewardScorer, index_dir: Path) -> Iterator[ServerThread]:
    config = ServeConfig(index=str(index_dir), **LIMITS)
    with ServerThread(create_app(scorer, config)) as running:
        yield running


@pytest.fixture()
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def expected_rewards(reference: RewardScorer, completions: list[str], labels: list[dict[str, Any]]) -> list[dict]:
    items = [RewardItem(completion=c, **label) for c, label in zip(completions, labels)]
    return reference.score(items)


# -- the OpenRLHF protocol ------------------------------------------------------------------------------------
def test_openrlhf_request_answered_exactly(http: httpx.Client, reference: RewardScorer) -> None:
    responses = [
        "<think>Chinese query about a dog and a frisbee.</think><answer>A brown dog catches a frisbee in a sunny "
        "park.</answer><|im_end|><|endoftext|>",
        "A dog catching a frisbee on the beach.<|eot_id|>",
        "<answer>A black dog catches a frisbee on a sandy beach.</answer><|im_end|>",
        "<answer>A brown dog chases a red ball across a sunny park.</answer><|im_end|>",
        "",  # empty: the format penalty, not an error
        "<think>still thinking, never answered",  # unparsable: the format penalty
    ]
    prompts = [QWEN_PROMPT, LLAMA_PROMPT, VLM_PROMPT, QWEN_PROMPT, QWEN_PROMPT, QWEN_PROMPT]
    queries = [p + r for p, r in zip(prompts, responses)]
    queries[2] = VLM_EXPANDED + responses[2]  # the prompt is no longer a prefix: split on the assistant header
    labels_raw: list[Any] = [
        json.dumps({"target_ids": ["cap000"], "query_id": "q1"}),  # a JSON string, as datasets store it
        "cap001",  # a bare id
        {"target_ids": ["cap001"], "reference_id": "cap000"},  # CIRR-style: the reference is excluded
        ["cap002", "cap003"],  # a list of targets
        {"target_ids": ["cap000"]},
        {"target_ids": ["cap000"]},
    ]
    labels = [{"target_ids": ["cap000"]}, {"target_ids": ["cap001"]},
              {"target_ids": ["cap001"], "reference_id": "cap000"}, {"target_ids": ["cap002", "cap003"]},
              {"target_ids": ["cap000"]}, {"target_ids": ["cap000"]}]
    r = http.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": labels_raw})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    n = len(queries)
    assert len(body["rewards"]) == n and len(body["scores"]) == n
    assert all(isinstance(x, float) for x in body["rewards"] + body["scores"])
    assert all(0.0 <= s <= 1.0 for s in body["scores"])
    expected = expected_rewards(reference, responses, labels)
    assert body["rewards"] == pytest.approx([e["reward"] for e in expected], abs=1e-5)
    logs = body["extra_logs"]
    for key in ("rank", "recall_at_1", "recall_at_5", "recall_at_10", "target_sim", "mean_sim", "margin",
                "format_ok", "truncated", "inflation_gap"):
        assert len(logs[key]) == n and all(isinstance(v, float) for v in logs[key]), key
    assert logs["rank"] == [e["rank"] for e in expected]
    assert body["rewards"][0] == 1.0 and logs["rank"][0] == 1.0  # the caption itself ranks first
    assert body["rewards"][4] == body["rewards"][5] == -1.0 and body["scores"][4] == 0.0  # format penalty
    assert logs["format_ok"][4] == 0.0
    # Score inflation in view: similarity to the target vs to the corpus.
    assert logs["inflation_gap"][0] == pytest.approx(logs["target_sim"][0] - logs["mean_sim"][0])
    assert logs["target_sim"][0] > logs["mean_sim"][0]


def test_scores_stay_the_rank_part_that_openrlhfs_dynamic_filtering_reads(http: httpx.Client) -> None:
    """A decision, pinned: scores are not rewards. OpenRLHF 0.11.2 keeps a prompt when its samples' mean score lies
    in --algo.dynamic_filtering_range, (0, 1) by default (samples_generator.py). A group of half empty completions
    (reward -1) and half rank-1 rewrites (reward 1) has the most to teach: its rewards average 0, its scores 0.5."""
    captions = ["A brown dog catches a frisbee in a sunny park."]
    label = json.dumps({"target_ids": ["cap000"]})
    group = [QWEN_PROMPT + "<answer></answer><|im_end|>"] * 2 + [QWEN_PROMPT + f"<answer>{captions[0]}</answer>"] * 2
    answer = http.post("/get_reward", json={"query": group, "labels": [label] * 4}).json()
    assert answer["rewards"][:2] == [-1.0, -1.0] and answer["extra_logs"]["rank"][2:] == [1.0, 1.0]
    assert sum(answer["rewards"]) / 4 <= 0.0 < sum(answer["scores"]) / 4 < 1.0  # kept only through scores
    assert answer["scores"] == [0.0, 0.0, 1.0, 1.0]


def test_openrlhf_without_prompts_and_empty(http: httpx.Client, reference: RewardScorer) -> None:
    response = "<answer>A brown dog catches a frisbee in a sunny park.</answer><|im_end|>"
    r = http.post("/get_reward", json={"query": [QWEN_PROMPT + response], "labels": ["cap000"]})
    assert r.status_code == 200 and r.json()["rewards"] == [1.0]
    r = http.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert r.status_code == 200 and r.json() == {"rewards": [], "scores": [], "extra_logs": {
        k: [] for k in r.json()["extra_logs"]}}


def test_ids_are_looked_up_once_per_item(http: httpx.Client, scorer: RewardScorer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The service validates a request's items (naming a bad id) and hands their rows to the scan: no second lookup."""
    looked_up: list[int] = []
    resolve = scorer.resolve_rows

    def counting(items: Any) -> Any:
        looked_up.append(len(items))
        return resolve(items)

    monkeypatch.setattr(scorer, "resolve_rows", counting)
    items = [{"rewrite": f"a dog number {i}", "target_ids": ["cap000"], "excluded_ids": ["cap001"]} for i in range(3)]
    r = http.post("/v1/rewards", json={"items": items})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert sum(looked_up) == 3


def test_overlong_rewrites_truncated_and_flagged(http: httpx.Client, reference: RewardScorer) -> None:
    long_text = " ".join(["a brown dog catches a frisbee in a sunny park"] * 60)  # ~600 tokens > 256
    giant = "dog " * 30_000  # 120k chars: cut before tokenizing, same embedding
    responses = [f"<answer>{long_text}</answer>", f"<answer>{giant}</answer><|im_end|>"]
    r = http.post("/get_reward", json={"query": [QWEN_PROMPT + x for x in responses],
                                       "prompts": [QWEN_PROMPT] * 2, "labels": ["cap000", "cap000"]})
    assert r.status_code == 200, r.text
    logs = r.json()["extra_logs"]
    assert logs["truncated"] == [1.0, 1.0]
    assert logs["format_ok"][1] == 0.0  # overlong (past the format's max_chars), still scored
    expected = expected_rewards(reference, responses, [{"target_ids": ["cap000"]}] * 2)
    assert r.json()["rewards"] == pytest.approx([e["reward"] for e in expected], abs=1e-5)
    assert logs["rank"] == [e["rank"] for e in expected]


def test_native_rewards_and_retrieve(http: httpx.Client, reference: RewardScorer) -> None:
    items = [{"rewrite": "A brown dog catches a frisbee in a sunny park.", "target_ids": ["cap000"],
              "query_id": "q1", "original_query": "狗 飞盘"},
             {"completion": "<answer>a dog on a beach</answer>", "target_ids": ["cap001"], "excluded_ids": ["cap000"]}]
    r = http.post("/v1/rewards", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = reference.score([RewardItem(**i) for i in items])
    assert [x["reward"] for x in body["results"]] == pytest.approx([e["reward"] for e in expected], abs=1e-5)
    assert body["keys"] == list(reference.keys) and set(body["results"][0]) == set(reference.keys)
    assert body["summary"]["count"] == 2.0 and "inflation_gap" in body["summary"]
    r = http.post("/retrieve", json={"queries": ["a dog catching a frisbee in a park", "wine at dinner"],
                                     "topk": 3, "return_scores": True})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert len(result) == 2 and all(len(row) == 3 for row in result)
    assert result[0][0]["document"]["id"] == "cap000" and isinstance(result[0][0]["score"], float)
    assert result[0][0]["score"] >= result[0][1]["score"] >= result[0][2]["score"]
    r = http.post("/retrieve", json={"queries": ["a dog"], "topk": 2, "return_scores": False})
    assert r.status_code == 200 and set(r.json()["result"][0][0]) == {"id", "contents"}


# -- Search-R1's agent on /retrieve ------------------------------------------------------------------------------
def search_r1_passages(retrieval_result: list[dict[str, Any]]) -> str:
    """How Search-R1's agent turns one query's /retrieve answer into the passages it reads, restated from
    search_r1/llm_agent/generation.py (_passages2string, line 459 at commit a14dc3a4; infer.py has the same): the
    first line of each document's contents is its title, the rest its text."""
    out = ""
    for position, doc_item in enumerate(retrieval_result):
        content = doc_item["document"]["contents"]
        title = content.split("\n")[0]
        text = "\n".join(content.split("\n")[1:])
        out += f"Doc {position + 1}(Title: {title}) {text}\n"
    return out


def search_r1_search(url: str, query: str, topk: int = 3) -> str:
    """Search-R1's agent's search: its request (generation.py _batch_search), then its passage formatting."""
    result = httpx.post(f"{url}/retrieve", json={"queries": [query], "topk": topk, "return_scores": True},
                        timeout=60).json()["result"]
    return search_r1_passages(result[0])


CAPTION_TEXT = {row["id"]: row["text"] for row in map(json.loads, data_path("captions.jsonl").read_text().splitlines())}


def test_search_r1_agent_reads_the_passages_of_a_text_corpus(server: ServerThread, http: httpx.Client,
                                                              minilm: TextEmbedder, tmp_path: Path) -> None:
    """Search-R1's formatting runs on our answers: each document's contents is the caption itself (one line, so its
    agent shows it as the title, as it shows an untitled passage of its own corpus); a titled corpus gives its title
    and text in Search-R1's own corpus format; an index built before texts were kept answers its ids."""
    found = http.post("/retrieve", json={"queries": ["a dog catching a frisbee in a park"], "topk": 3,
                                         "return_scores": True}).json()
    assert found["contents_kind"] == "text"
    top = [doc["document"]["id"] for doc in found["result"][0]]
    assert search_r1_search(server.url, "a dog catching a frisbee in a park") == "".join(
        f"Doc {n}(Title: {CAPTION_TEXT[i]}) \n" for n, i in enumerate(top, 1))

    rows = [{"id": "w1", "title": "Frisbee", "text": "A frisbee is a gliding disc.\nDogs catch it in parks."},
            {"id": "w2", "title": "Tea", "text": "Tea is a drink made from leaves."}]
    source = tmp_path / "wiki.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    titled = build_index(read_source(source), minilm, tmp_path / "wiki", progress=False)
    with ServerThread(create_app(RewardScorer(minilm, titled, RewardConfig()))) as wiki:
        assert search_r1_search(wiki.url, "what do dogs catch in a park?", topk=2) == (
            'Doc 1(Title: "Frisbee") A frisbee is a gliding disc.\nDogs catch it in parks.\n'
            'Doc 2(Title: "Tea") Tea is a drink made from leaves.\n')

    old = CorpusIndex(titled.embeddings, titled.ids, titled.manifest)  # no contents store, as a pre-text index
    with ServerThread(create_app(RewardScorer(minilm, old, RewardConfig()))) as legacy:
        answer = httpx.post(f"{legacy.url}/retrieve", json={"queries": ["tea"], "topk": 1}, timeout=60).json()
        assert answer == {"result": [[{"id": "w2", "contents": "w2"}]], "contents_kind": "id"}
        assert search_r1_search(legacy.url, "tea", topk=1) == "Doc 1(Title: w2) \n"


def test_health_ready_info_metrics(http: httpx.Client, scorer: RewardScorer) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"ready": True}
    info = http.get("/info").json()
    assert info["retriever"]["fingerprint"] == scorer.retriever.fingerprint
    assert info["index"]["corpus_size"] == 100 and info["index"]["fingerprint"] == scorer.retriever.fingerprint
    assert info["reward_config"]["shape"] == "log" and info["version"]
    assert "token" not in info["server"] and info["server"]["auth"] is False
    # A scored batch of its own: the per-batch series exist once one has run (not only after earlier tests).
    scored = http.post("/v1/rewards", json={"items": [{"rewrite": "a dog on the grass", "target_ids": ["cap000"]}]})
    assert scored.status_code == 200, scored.text
    text = http.get("/metrics").text
    assert _metric(text, "grape_queue_items") == 0.0  # nothing waits once the batch is answered
    for name in ("grape_requests_total", "grape_request_seconds_bucket", "grape_batch_items_bucket",
                 "grape_queue_wait_seconds_bucket", "grape_encode_seconds_bucket", "grape_score_seconds_bucket",
                 "grape_cache_hit_ratio", "grape_target_sim_bucket", "grape_mean_sim_bucket", "grape_reward_bucket",
                 'grape_batch_stat{stat="inflation_gap"}', "grape_ready 1.0"):
        assert name in text, name


# -- concurrency ------------------------------------------------------------------------------------------------
def _metric(text: str, name: str, default: float | None = None) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    if match is None and default is not None:
        return default
    assert match, name
    return float(match.group(1))


@pytest.mark.slow
def test_500_concurrent_single_sample_requests(server: ServerThread, reference: RewardScorer) -> None:
    captions = [json.loads(line) for line in data_path("captions.jsonl").read_text().splitlines()]
    n = 500
    samples = []
    for i in range(n):
        cap = captions[i % len(captions)]
        rewrite = f"{cap['text'].rstrip('.')} (take {i // len(captions)})" if i >= len(captions) else cap["text"]
        target = captions[(i * 7) % len(captions)]["id"]  # mostly not the rewrite's own caption: varied ranks
        samples.append((rewrite, target))
    before = httpx.get(server.url + "/metrics").text

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(client.post("/get_reward", json={
                "query": [QWEN_PROMPT + f"<answer>{rw}</answer><|im_end|>"], "prompts": [QWEN_PROMPT],
                "labels": [json.dumps({"target_ids": [t]})]}) for rw, t in samples))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * n
    got = [r.json()["rewards"][0] for r in responses]
    ranks = [r.json()["extra_logs"]["rank"][0] for r in responses]
    expected = reference.score([RewardItem(rewrite=rw, target_ids=[t]) for rw, t in samples])
    assert got == pytest.approx([e["reward"] for e in expected], abs=1e-5)
    assert ranks == [e["rank"] for e in expected]
    after = httpx.get(server.url + "/metrics").text
    batches = _metric(after, "grape_batch_items_count") - _metric(before, "grape_batch_items_count")
    items = _metric(after, "grape_batch_items_sum") - _metric(before, "grape_batch_items_sum")
    singles = (_metric(after, 'grape_batch_items_bucket{le="1.0"}')
               - _metric(before, 'grape_batch_items_bucket{le="1.0"}'))
    assert items == n
    assert batches < n and singles < batches, f"{batches} batches for {n} requests, {singles} of size 1"


# -- bad input --------------------------------------------------------------------------------------------------
_GOOD_Q = QWEN_PROMPT + "<answer>a dog</answer>"
BAD_INPUTS: list[tuple[str, str, Any, int, str]] = [
    # (name, path, body: bytes or JSON-able, status, message fragment)
    ("malformed JSON", "/get_reward", b'{"query": [', 400, "not valid JSON"),
    ("empty body", "/get_reward", b"", 400, "request body is empty"),
    ("not an object", "/get_reward", ["a"], 422, "expected a JSON object"),
    ("missing query", "/get_reward", {"prompts": [""], "labels": ["cap000"]}, 422, "missing field 'query'"),
    ("missing labels", "/get_reward", {"query": [_GOOD_Q]}, 422, "missing field 'labels'"),
    ("query not a list", "/get_reward", {"query": _GOOD_Q, "labels": ["cap000"]}, 422, "'query' must be a list"),
    ("query item not a string", "/get_reward", {"query": [3], "labels": ["cap000"]}, 422,
     "query[0] must be a string"),
    ("prompt not a string", "/get_reward", {"query": [_GOOD_Q], "prompts": [5], "labels": ["cap000"]}, 422,
     "prompts[0] must be a string"),
    ("fewer labels than queries", "/get_reward", {"query": [_GOOD_Q, _GOOD_Q], "labels": ["cap000"]}, 422,
     "got 2 queries but 1 labels"),
    ("more prompts than queries", "/get_reward", {"query": [_GOOD_Q], "prompts": ["", ""], "labels": ["cap000"]},
     422, "got 1 queries but 2 prompts"),
    ("label is broken JSON", "/get_reward", {"query": [_GOOD_Q], "labels": ['{"target_ids": [']}, 422,
     "labels[0]: label is not valid JSON"),
    ("label without targets", "/get_reward", {"query": [_GOOD_Q], "labels": [{"reference_id": "cap001"}]}, 422,
     "labels[0]: bad label (target_ids: Field required)"),
    ("label with no target", "/get_reward", {"query": [_GOOD_Q], "labels": [{"target_ids": []}]}, 422,
     "labels[0]: bad label (target_ids"),
    ("empty label", "/get_reward", {"query": [_GOOD_Q], "labels": [""]}, 422, "labels[0]: empty label"),
    ("unknown target id", "/get_reward", {"query": [_GOOD_Q, _GOOD_Q], "labels": ["cap000", "img_404"]}, 422,
     "labels[1]: unknown corpus id 'img_404'"),
    ("unknown reference id", "/get_reward",
     {"query": [_GOOD_Q], "labels": [{"target_ids": ["cap000"], "reference_id": "ref_404"}]}, 422,
     "unknown corpus id 'ref_404'"),
    ("oversize batch", "/get_reward", {"query": [_GOOD_Q] * 65, "labels": ["cap000"] * 65}, 413,
     "too many samples in one request: 65 > max_items_per_request=64"),
    ("oversize body", "/get_reward", {"query": ["x" * 250_000], "labels": ["cap000"]}, 413,
     "request body too large"),
    ("native: no items", "/v1/rewards", {"rewrite": "a dog"}, 422, "missing field 'items'"),
    ("native: no targets", "/v1/rewards", {"items": [{"rewrite": "a dog"}]}, 422,
     "items[0].target_ids: Field required"),
    ("native: unknown field", "/v1/rewards", {"items": [{"rewrite": "a", "target_ids": ["cap000"], "tag": 1}]},
     422, "items[0].tag: Extra inputs are not permitted"),
    ("native: no text", "/v1/rewards", {"items": [{"target_ids": ["cap000"]}]}, 422,
     "items[0]: give 'completion'"),
    ("native: wrong type", "/v1/rewards", {"items": [{"rewrite": 5, "target_ids": ["cap000"]}]}, 422,
     "items[0].rewrite: Input should be a valid string"),
    ("native: unknown id", "/v1/rewards", {"items": [{"rewrite": "a", "target_ids": ["cap000"],
                                                      "excluded_ids": ["gone"]}]}, 422, "unknown corpus id 'gone'"),
    ("retrieve: bad topk", "/retrieve", {"queries": ["a dog"], "topk": 0}, 422, "'topk' must be a positive integer"),
    ("retrieve: topk too large", "/retrieve", {"queries": ["a dog"], "topk": 51}, 422, "above max_topk=50"),
    ("retrieve: queries not a list", "/retrieve", {"queries": "a dog"}, 422, "'queries' must be a list"),
    ("retrieve: bad flag", "/retrieve", {"queries": ["a"], "return_scores": "yes"}, 422, "'return_scores' must be"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_4xx_naming_the_problem(http: httpx.Client, name: str, path: str, body: Any, status: int,
                                               message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.json()["detail"]


def test_fast_routes_answer_what_fastapis_routes_answer(scorer: RewardScorer, index_dir: Path) -> None:
    """The raw-ASGI shortcut (``fast_routes``) and FastAPI's own routes give the same status and body, good input
    and bad (every case of BAD_INPUTS, a good request of each route)."""
    good = [("/get_reward", {"query": [_GOOD_Q], "labels": ["cap000"]}),
            ("/v1/rewards", {"items": [{"rewrite": "a dog catching a frisbee", "target_ids": ["cap000"]}]}),
            ("/retrieve", {"queries": ["a dog"], "topk": 3})]
    cases = good + [(path, body) for _, path, body, _, _ in BAD_INPUTS]
    answers: dict[bool, list[tuple[int, Any]]] = {}
    for fast in (True, False):
        config = ServeConfig(index=str(index_dir), fast_routes=fast, **LIMITS)
        with ServerThread(create_app(scorer, config)) as running, \
                httpx.Client(base_url=running.url, timeout=60) as client:
            answers[fast] = []
            for path, body in cases:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = client.post(path, content=content, headers={"Content-Type": "application/json"})
                answers[fast].append((r.status_code, r.json()))
    assert [a[0] for a in answers[True][:3]] == [200, 200, 200]
    for case, fast, plain in zip(cases, answers[True], answers[False]):
        assert fast == plain, case[0]


def test_a_4xx_leaves_one_rate_limited_warning_with_its_reason(server: ServerThread, http: httpx.Client,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """OpenRLHF's client never reads a 422 body: the service logs the reason (not the body), once per reason."""
    monkeypatch.setattr(server.app.state.service, "rejections", RejectionLog(logging.getLogger("grape_rewards.server")))
    body = {"query": ["SECRET-COMPLETION a dog"], "labels": [{"target_ids": ["no-such-id-4xx"]}]}
    with caplog.at_level(logging.WARNING, logger="grape_rewards.server"):
        for _ in range(30):
            assert http.post("/get_reward", json=body).status_code == 422
        assert http.post("/get_reward", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    lines = [r for r in caplog.records if r.name == "grape_rewards.server" and r.levelno == logging.WARNING]
    bad_label = [r.getMessage() for r in lines if "no-such-id-4xx" in r.getMessage()]
    assert len(bad_label) == 1, bad_label  # the burst of 30 identical 422s: one line
    assert "/get_reward" in bad_label[0] and "422" in bad_label[0] and "unknown corpus id" in bad_label[0]
    assert any("400" in r.getMessage() for r in lines if r not in bad_label)  # another reason: its own line
    assert not any("SECRET-COMPLETION" in r.getMessage() for r in lines)  # the reason only, never the body


def test_rejection_log_rule() -> None:
    """One line per reason per interval (the next one counts those not logged), at most max_lines per interval."""
    now = [0.0]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("grape_rewards.test_rejections")
    log.addHandler(Collect())
    log.propagate = False
    rejections = RejectionLog(log, interval_s=60, max_lines=3, max_chars=50, clock=lambda: now[0])
    assert rejections.note("/get_reward", 422, "labels[0]: bad")
    assert not any(rejections.note("/get_reward", 422, "labels[0]: bad") for _ in range(9))
    for i in range(1, 5):  # distinct reasons: two fit under max_lines=3, two are dropped
        rejections.note("/get_reward", 422, f"labels[{i}]: bad")
    assert len(records) == 3
    now[0] = 61.0
    assert rejections.note("/get_reward", 422, "labels[0]: bad" + "x" * 100)  # cut to 50: a new reason
    assert "…" in records[-1] and "x" * 50 not in records[-1]
    assert rejections.note("/get_reward", 422, "labels[0]: bad")
    assert "9 more like it" in records[-1]
    assert "2 other rejections were not logged" in records[-2]
    with pytest.raises(ValueError, match="interval_s > 0"):
        RejectionLog(log, interval_s=0)


def test_wrong_method_and_path(http: httpx.Client) -> None:
    assert http.get("/get_reward").status_code == 405
    assert http.post("/nope", json={}).status_code == 404


def test_healthy_after_bad_inputs(http: httpx.Client) -> None:
    """After every bad input of the table (sent here, so the test does not depend on the order tests run in), the
    service is still ready and still scores."""
    for _, path, body, status, _ in BAD_INPUTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert http.post(path, content=content, headers={"Content-Type": "application/json"}).status_code == status
    assert http.get("/ready").status_code == 200
    r = http.post("/get_reward", json={"query": [_GOOD_Q], "prompts": [QWEN_PROMPT], "labels": ["cap000"]})
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1


DEEP = "[" * 5000 + "]" * 5000
HOSTILE: list[tuple[str, str, bytes, int, str]] = [
    # (name, path, raw body, status, message fragment): what reached a 500 before
    ("nested body", "/v1/rewards", b'{"items": ' + DEEP.encode() + b"}", 400, "nests deeper than the parser allows"),
    ("nested retrieve body", "/retrieve", b'{"queries": ' + DEEP.encode() + b"}", 400, "nests deeper"),
    ("nested label string", "/get_reward", json.dumps({"query": [_GOOD_Q], "labels": [DEEP]}).encode(), 422,
     "labels[0]: label is not valid JSON (it nests deeper"),
    ("surrogate in a label's original_query", "/get_reward",
     json.dumps({"query": [_GOOD_Q], "labels": ['{"target_ids": ["cap000"], "original_query": "a\\ud800"}']}).encode(),
     422, "labels[0].original_query: a lone UTF-16 surrogate (U+D800) at character 1"),
    ("surrogate in a rewrite", "/v1/rewards", b'{"items": [{"rewrite": "a\\udfff", "target_ids": ["cap000"]}]}', 422,
     "items[0].rewrite: a lone UTF-16 surrogate (U+DFFF)"),
    ("surrogate in an original_query", "/v1/rewards",
     b'{"items": [{"rewrite": "a", "original_query": "\\ud83d", "target_ids": ["cap000"]}]}', 422,
     "items[0].original_query: a lone UTF-16 surrogate"),
    ("surrogate in a completion (OpenRLHF)", "/get_reward",
     b'{"query": ["<|im_start|>assistant\\n\\ud800"], "labels": ["cap000"]}', 422, "query[0]: a lone UTF-16"),
    ("surrogate in a retrieve query", "/retrieve", b'{"queries": ["\\ud800"]}', 422, "queries[0]: a lone UTF-16"),
    ("surrogate in an unknown field", "/v1/rewards", b'{"items": [], "\\ud800": 1}', 422, "unknown field(s)"),
]


@pytest.mark.parametrize("parser", ["orjson", "json"])
def test_hostile_json_gets_4xx(http: httpx.Client, monkeypatch: pytest.MonkeyPatch, parser: str) -> None:
    """Deep nesting and lone surrogates, with orjson and with the standard library's parser (the fallback when
    orjson is not installed: it recurses, and it accepts lone surrogates)."""
    from grape_rewards import labels
    from grape_rewards.server import protocol

    if parser == "json":
        monkeypatch.setattr(protocol, "loads", json.loads)
        monkeypatch.setattr(protocol, "JSONDecodeError", (json.JSONDecodeError, UnicodeDecodeError))
        monkeypatch.setattr(labels, "_json_loads", json.loads)
    for name, path, body, status, message in HOSTILE:
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (name, r.text)
        if parser == "json":
            assert r.status_code == status and message in r.json()["detail"], (name, r.text)
    assert http.get("/ready").status_code == 200


def test_chunked_body_over_the_limit_is_413_on_every_post_route(http: httpx.Client) -> None:
    def chunks():
        for _ in range(30):
            yield b'{"queries": ["' + b"x" * 10_000 + b'"]}'

    for path in ("/retrieve", "/v1/rewards", "/get_reward"):
        r = http.post(path, content=chunks())  # a generator: sent chunked, no Content-Length
        assert r.status_code == 413 and "request body too large" in r.json()["detail"], (path, r.text)


def test_every_text_reaching_the_encoder_is_cut(http: httpx.Client, scorer: RewardScorer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Original queries (native items and OpenRLHF labels) and /retrieve queries too, not only rewrites."""
    seen: list[int] = []
    real = scorer.retriever.encode_texts_with_info

    def spy(texts: Any, batch_size: int = 256) -> Any:
        seen.extend(len(t) for t in texts)
        return real(texts, batch_size=batch_size)

    monkeypatch.setattr(scorer.retriever, "encode_texts_with_info", spy)
    long = "a dog " * 30_000  # 180,000 characters, under max_body_bytes=200,000
    limit = ServeConfig(index="i").max_text_chars
    for path, body in [
        ("/v1/rewards", {"items": [{"rewrite": "a dog", "target_ids": ["cap000"], "original_query": long}]}),
        ("/get_reward", {"query": [_GOOD_Q], "labels": [{"target_ids": ["cap001"], "original_query": "b " + long}]}),
        ("/retrieve", {"queries": ["c " + long], "topk": 1}),
    ]:
        seen.clear()
        r = http.post(path, json=body)
        assert r.status_code == 200, r.text
        assert seen and max(seen) <= limit, (path, max(seen))


def test_caches_are_bounded_by_bytes(scorer: RewardScorer) -> None:
    from grape_rewards.scorer import LRUCache

    cache = LRUCache(capacity=1000, max_bytes=100_000)
    for i in range(50):
        cache.put(("fp", f"{i} " + "x" * 10_000), i)
    assert cache.nbytes <= 100_000 and 5 <= len(cache) < 10
    assert cache.get(("fp", "49 " + "x" * 10_000)) == 49 and cache.get(("fp", "0 " + "x" * 10_000)) is None
    cache.put(("fp", "y" * 200_000), 0)  # larger than the whole cache: not kept, nothing evicted for it
    assert len(cache) >= 5
    small = RewardScorer(scorer.retriever, scorer.index, RewardConfig(), cache_bytes=50_000)
    small.encode([f"text {i} " + "z" * 3000 for i in range(40)])
    assert small.embedding_cache.nbytes <= 50_000 and len(small.embedding_cache) < 40


def test_a_500_names_no_exception_text(http: httpx.Client, scorer: RewardScorer,
                                       monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(items: Any) -> Any:
        raise RuntimeError("secret /srv/data/path in the message")

    monkeypatch.setattr(scorer, "score_batch", broken)
    r = http.post("/v1/rewards", json={"items": [{"rewrite": "a dog", "target_ids": ["cap000"]}]})
    assert r.status_code == 500 and "secret" not in r.text and "RuntimeError" not in r.text
    error_id = re.search(r"internal error (\w+)", r.json()["detail"]).group(1)
    assert any(error_id in rec.getMessage() for rec in caplog.records)  # the log has it, under that id


def test_retrieve_is_admitted_like_scoring(server: ServerThread, http: httpx.Client,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = server.app.state.service.batcher

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise QueueFull(8192, 1, 8192, retry_after=2)

    monkeypatch.setattr(batcher, "_enqueue", full)
    r = http.post("/retrieve", json={"queries": ["a dog"], "topk": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "2" and "queue is full" in r.json()["detail"]


def test_batcher_searches_concurrent_retrieve_requests_in_one_batch_behind_the_queue_limit(
        scorer: RewardScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    from grape_rewards.server import batcher as batcher_module
    from grape_rewards.server.batcher import SearchQuery

    calls: list[int] = []
    real = batcher_module.search_batch

    def counted(sc: Any, queries: Any, topk: int, backend: str) -> Any:
        calls.append(len(queries))
        return real(sc, queries, topk, backend)

    monkeypatch.setattr(batcher_module, "search_batch", counted)

    async def main() -> None:
        b = MicroBatcher(scorer, max_batch_size=64, max_wait_ms=0, max_queue=10)
        b.start()
        texts = ["a dog", "a cat", "a beach", "wine at dinner"]
        got = await asyncio.gather(*(b.submit_retrieve([SearchQuery(t)], topk=k + 1, backend="torch")
                                     for k, t in enumerate(texts)))
        for k, (t, rows) in enumerate(zip(texts, got)):
            scores, ids = scorer.index.search(scorer.encode([t])[0], k + 1, backend="torch")
            assert rows[0][1] == ids[0] and rows[0][0] == pytest.approx(scores[0].tolist(), abs=1e-6)
        assert sum(calls) == 4 and len(calls) < 4  # coalesced
        with pytest.raises(QueueFull):  # the same admission as scoring
            await asyncio.gather(b.submit([RewardItem(rewrite="x", target_ids=["cap000"])] * 10),
                                 b.submit_retrieve([SearchQuery("a dog")], topk=1))
        await b.close()

    asyncio.run(main())


def test_openapi_contract_and_answers_that_follow_it(http: httpx.Client) -> None:
    from grape_rewards.server.schema import OpenRLHFResponse, RetrieveResponse, RewardsResponse

    spec = http.get("/openapi.json").json()
    for path, model in [("/get_reward", "OpenRLHFRequest"), ("/v1/rewards", "RewardsRequest"),
                        ("/retrieve", "RetrieveRequest")]:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"} and model in spec["components"]["schemas"]
        assert "422" in spec["paths"][path]["post"]["responses"]
    assert "RewardItem" in spec["components"]["schemas"] and "Label" in spec["components"]["schemas"]
    r = http.post("/get_reward", json={"query": [_GOOD_Q], "labels": ["cap000"]})
    OpenRLHFResponse.model_validate(r.json())
    r = http.post("/v1/rewards", json={"items": [{"rewrite": "a dog", "target_ids": ["cap000"]}]})
    RewardsResponse.model_validate(r.json())
    for flag in (True, False):
        RetrieveResponse.model_validate(http.post("/retrieve", json={"queries": ["a"], "return_scores": flag}).json())


def allowed_by(spec: dict[str, Any], model: str, body: Any) -> bool:
    """Whether the published schema of ``model`` allows ``body``."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": f"#/components/schemas/{model}", "components": spec["components"]}
                                ).is_valid(body)


def test_the_published_schema_allows_no_body_the_service_refuses_for_its_shape(http: httpx.Client) -> None:
    """What schemathesis found the schema allowing and the service refusing (422), and /metrics' content type."""
    spec = http.get("/openapi.json").json()
    item = {"rewrite": "a dog", "target_ids": ["cap000"]}
    refused = [("RewardsRequest", {"items": [{**item, "rewrite": None}]}),  # neither completion nor rewrite
               ("RewardsRequest", {"items": [{**item, "completion": None, "rewrite": None}]}),
               ("RewardsRequest", {"items": [{**item, "target_ids": [""]}]}),  # an empty id
               ("RewardsRequest", {"items": [item] * (LIMITS["max_items_per_request"] + 1)}),
               ("OpenRLHFRequest", {"query": [_GOOD_Q], "labels": [[]]}),  # a label of no ids
               ("OpenRLHFRequest", {"query": [_GOOD_Q], "labels": [""]}),
               ("OpenRLHFRequest", {"query": [_GOOD_Q], "labels": [{"target_ids": [""]}]}),
               ("RetrieveRequest", {"queries": ["a dog"], "topk": LIMITS["max_topk"] + 1}),
               ("RetrieveRequest", {"queries": ["a dog"], "reference_ids": [""]})]
    for model, body in refused:
        path = {"RewardsRequest": "/v1/rewards", "OpenRLHFRequest": "/get_reward", "RetrieveRequest": "/retrieve"}
        assert http.post(path[model], json=body).status_code in (413, 422), body
        assert not allowed_by(spec, model, body), body
    for model, body in [("RewardsRequest", {"items": [item, {"completion": "<answer>a cat</answer>",
                                                             "rewrite": None, "target_ids": ["cap001"]}]}),
                        ("OpenRLHFRequest", {"query": [_GOOD_Q], "labels": [{"target_ids": ["cap000"]}]}),
                        ("RetrieveRequest", {"queries": ["a dog"], "topk": 3.0})]:
        assert allowed_by(spec, model, body), body
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == [http.get("/metrics").headers["content-type"]] == [
        "text/plain; version=0.0.4; charset=utf-8"]
    assert http.get("/docs").status_code == 404  # its page would load scripts from a CDN: /openapi.json is the contract


def test_the_schema_asks_for_what_the_reward_settings_need() -> None:
    """The relative mode needs every sample's original query; a composed retriever its reference image's id (so a
    label's short forms, which carry none, are left out), and /retrieve one reference id per query."""
    from pydantic.json_schema import models_json_schema

    from grape_rewards.server.schema import REF, REQUESTS, contract

    _, defs = models_json_schema([(m, "validation") for m in REQUESTS.values()], ref_template=REF)
    plain = {"components": {"schemas": contract(defs["$defs"], max_items=8, max_topk=5)}}
    strict = {"components": {"schemas": contract(defs["$defs"], max_items=8, max_topk=5, relative=True,
                                                 reference=True, search_reference=True)}}
    item = {"rewrite": "a dog", "target_ids": ["cap000"]}
    cases = [("RewardsRequest", {"items": [item]}),
             ("RewardsRequest", {"items": [{**item, "reference_id": "cap001", "original_query": " "}]}),
             ("OpenRLHFRequest", {"query": ["q"], "labels": ["cap000"]}),
             ("OpenRLHFRequest", {"query": ["q"], "labels": [{"target_ids": ["cap000"], "original_query": "a"}]}),
             ("RetrieveRequest", {"queries": ["a dog"]})]
    for model, body in cases:
        assert allowed_by(plain, model, body) and not allowed_by(strict, model, body), body
    for model, body in [("RewardsRequest", {"items": [{**item, "reference_id": "cap001", "original_query": "a"}]}),
                        ("OpenRLHFRequest", {"query": ["q"], "labels": [
                            {"target_ids": ["cap000"], "reference_id": "cap001", "original_query": "a"}]}),
                        ("RetrieveRequest", {"queries": ["a dog"], "reference_ids": ["cap001"]})]:
        assert allowed_by(strict, model, body), body


@pytest.mark.slow
def test_schemathesis_with_every_check_finds_nothing_on_the_published_schema(server: ServerThread,
                                                                             scorer: RewardScorer,
                                                                             tmp_path: Path) -> None:
    """schemathesis' command line, every check (no server error; documented statuses, content types and response
    schemas; schema-valid requests accepted, schema-violating ones refused; methods not allowed...), generating
    requests from the service's own /openapi.json: coverage and fuzzing phases, 40 examples per operation, a fixed
    seed. tests/schemathesis_hooks.py makes generated ids name corpus items and side-by-side lists equally long (the
    two rules the schema states in words); tests/schemathesis.toml counts a 413 (over a limit) as a refusal."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "GRAPE_SCHEMATHESIS_IDS": json.dumps(
        scorer.index.ids), "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tests / "schemathesis.toml"), "run",
               f"{server.url}/openapi.json", "--checks", "all", "--phases", "coverage,fuzzing", "--max-examples",
               "40", "--seed", "1", "--generation-database", "none", "--no-color"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert "No issues found" in done.stdout and " passed" in done.stdout


def test_queue_full_is_503_with_retry_after(server: ServerThread, http: httpx.Client,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = server.app.state.service.batcher

    async def full(items: Any, rows: Any = None) -> Any:
        raise QueueFull(8192, len(items), 8192, retry_after=3)

    monkeypatch.setattr(batcher, "submit", full)
    r = http.post("/get_reward", json={"query": [_GOOD_Q], "labels": ["cap000"]})
    assert r.status_code == 503 and r.headers["retry-after"] == "3" and "queue is full" in r.json()["detail"]


# -- auth and binding ---------------------------------------------------------------------------------------------
def test_token_auth(scorer: RewardScorer, index_dir: Path) -> None:
    app = create_app(scorer, ServeConfig(index=str(index_dir), token="s3cret-token"))
    body = {"query": [_GOOD_Q], "labels": ["cap000"]}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200  # probes stay open
        r = http.post("/get_reward", json=body)
        assert r.status_code == 401 and "missing bearer token" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = http.post("/get_reward", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid bearer token"
        assert http.get("/metrics").status_code == 401 and http.get("/info").status_code == 401
        ok = {"Authorization": "Bearer s3cret-token"}
        assert http.post("/get_reward", json=body, headers=ok).status_code == 200
        for scheme in ("bearer", "BEARER", "bEaReR"):  # RFC 9110: the scheme is case-insensitive
            r = http.post("/get_reward", json=body, headers={"Authorization": f"{scheme} s3cret-token"})
            assert r.status_code == 200, (scheme, r.text)
        assert http.post("/get_reward", json=body, headers={"Authorization": "Basic s3cret-token"}).status_code == 401
        assert http.post("/get_reward", json=body, headers={"Authorization": "s3cret-token"}).status_code == 401
        assert http.get("/openapi.json").status_code == 200  # the contract is public, like the probes
        assert "s3cret" not in http.get("/info", headers=ok).text


def test_refuses_public_bind_without_token(index_dir: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAPE_TOKEN", raising=False)
    monkeypatch.delenv("GRAPE_INSECURE", raising=False)
    assert cli_main(["serve", "--index", str(index_dir), "--host", "0.0.0.0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "refusing to bind 0.0.0.0" in err and "GRAPE_TOKEN" in err and "--insecure" in err
    with pytest.raises(ConfigError, match="refusing to bind"):
        ServeConfig(index="i", host="10.1.2.3").check_bind()
    ServeConfig(index="i", host="0.0.0.0", token="t").check_bind()
    ServeConfig(index="i", host="0.0.0.0", insecure=True).check_bind()
    ServeConfig(index="i", host="::1").check_bind()


def test_token_flag_warns_that_it_is_visible_in_the_process_list(index_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from grape_rewards.server import app as app_module

    class Stop(Exception):
        pass

    def stop(config: Any) -> Any:
        raise Stop

    monkeypatch.setattr(app_module, "load_scorer", stop)
    with caplog.at_level("WARNING", logger="grape_rewards.server"), pytest.raises(Stop):
        cli_main(["serve", "--index", str(index_dir), "--token", "s3cret", "--device", "cpu"])
    assert any("process list" in r.getMessage() and "GRAPE_TOKEN" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv("GRAPE_TOKEN", "s3cret")
    with caplog.at_level("WARNING", logger="grape_rewards.server"), pytest.raises(Stop):
        cli_main(["serve", "--index", str(index_dir), "--device", "cpu"])
    assert not any("process list" in r.getMessage() for r in caplog.records)


def _raw_exchange(port: int, data: bytes, wait: float = 30.0) -> bytes:
    """Send raw bytes on a fresh connection; what the server answers until it closes (or ``wait`` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        got = b""
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
        return got


def test_slow_bodies_and_huge_heads_are_cut_off(scorer: RewardScorer, index_dir: Path) -> None:
    """A client that announces more body than it sends gets 408 after body_timeout_s; a request head over
    max_header_bytes is refused by the parser (no memory held for it)."""
    config = ServeConfig(index=str(index_dir), body_timeout_s=0.5, max_header_bytes=8192)
    with ServerThread(create_app(scorer, config)) as srv:
        for path in ("/get_reward", "/retrieve"):
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    "Content-Length: 1000\r\n\r\n").encode()
            answer = _raw_exchange(srv.port, head + b'{"query": [')
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"body_timeout_s=0.5" in answer
        huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1_000_000 + b"\r\n\r\n"
        answer = _raw_exchange(srv.port, huge)
        assert answer.startswith(b"HTTP/1.1 431") or not answer, answer[:200]  # refused, or the connection closed
        assert b"200 OK" not in answer
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:  # a head that has not ended
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n"
                         + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 100) for i in range(85)))
            got = sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 431"), got[:200]
        assert b"max_header_bytes=8192" in got
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:  # keep-alive: heads reset
            for _ in range(3):
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 6000 + b"\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with httpx.Client(base_url=srv.url) as http:
            assert http.get("/health", headers={"X-Pad": "a" * 4000}).status_code == 200  # under the cap: fine


def test_serve_on_a_taken_port_fails_before_loading(index_dir: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import grape_rewards.server.app as app_module

    def must_not_load(config: ServeConfig) -> None:
        raise AssertionError("the model and index were loaded before the port was checked")

    monkeypatch.setattr(app_module, "load_scorer", must_not_load)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = cli_main(["serve", "--index", str(index_dir), "--port", str(port), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "another process holds the port" in err


def test_config_precedence(tmp_path: Path) -> None:
    (tmp_path / "reward.yaml").write_text("shape: linear\n")
    config_file = tmp_path / "serve.yaml"
    config_file.write_text("index: /data/idx\nport: 9001\nmax_batch_size: 32\nmax_wait_ms: 2\n"
                           "reward_config: reward.yaml\n")
    env = {"GRAPE_PORT": "9002", "GRAPE_MAX_BATCH_SIZE": "64", "GRAPE_TOKEN": "from-env"}
    config = load_config(config_file, {"port": 9003, "cache_size": None}, environ=env)
    assert (config.index, config.port, config.max_batch_size, config.max_wait_ms) == ("/data/idx", 9003, 64, 2.0)
    assert config.token == "from-env" and "from-env" not in repr(config)
    assert config.load_reward_config().shape == "linear"  # relative to the YAML's folder
    assert load_config(config_file, environ={}).port == 9001
    with pytest.raises(ConfigError, match=r"max_batch_size: .*from env GRAPE_MAX_BATCH_SIZE"):
        load_config(config_file, environ={"GRAPE_MAX_BATCH_SIZE": "0"})
    with pytest.raises(ConfigError, match="no index folder given"):
        load_config(None, environ={})
    with pytest.raises(ConfigError, match="batch: unknown setting"):
        load_config(_write(tmp_path / "bad.yaml", "index: i\nbatch: 3\n"), environ={})


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- the micro-batcher alone --------------------------------------------------------------------------------------
class _GatedScorer:
    """A stand-in scorer: blocks until released, fails any batch holding a 'poison' item."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[int] = []
        self.with_rows = 0

    def score_batch(self, items: list[Any], rows: Any = None) -> ScoredBatch:
        self.gate.wait(10)
        if any(i == "poison" for i in items):
            raise ValueError("poisoned item")
        if rows is not None:  # the validated rows travel with their items, in the same order
            assert rows[0] == [[i] for i in items] and rows[1] == [[] for _ in items]
            self.with_rows += 1
        self.batches.append(len(items))
        return ScoredBatch([{"reward": float(i)} for i in items], {})


def test_batcher_bounds_queue_isolates_failures_and_does_not_wait_alone() -> None:
    async def scenario() -> None:
        fake = _GatedScorer()
        batcher = MicroBatcher(fake, max_batch_size=8, max_wait_ms=300, max_queue=4)  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([1, 2]))
        await asyncio.sleep(0.05)  # the first batch is on the device, blocked
        queued = [asyncio.ensure_future(batcher.submit([3, 4])), asyncio.ensure_future(batcher.submit(["poison"]))]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.submit([5, 6])
        fake.gate.set()
        assert await first == [{"reward": 1.0}, {"reward": 2.0}]
        assert await queued[0] == [{"reward": 3.0}, {"reward": 4.0}]  # its batch failed; rescored alone
        with pytest.raises(ValueError, match="poisoned"):
            await queued[1]
        # A lone request is not held back for max_wait_ms (300 ms here): no fixed wait when nothing is queued.
        await asyncio.sleep(0.35)
        for _ in range(3):
            t0 = time.perf_counter()
            assert await batcher.submit([7]) == [{"reward": 7.0}]
            assert time.perf_counter() - t0 < 0.15
        await batcher.close(timeout=5)
        assert fake.batches[0] == 2

    asyncio.run(scenario())


def test_batcher_coalesces_concurrent_requests() -> None:
    async def scenario() -> None:
        fake = _GatedScorer()
        batcher = MicroBatcher(fake, max_batch_size=64, max_wait_ms=5, max_queue=1000)  # type: ignore[arg-type]
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit([0]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit([i], ([[i]], [[]]))) for i in range(1, 101)]
        await asyncio.sleep(0.05)
        fake.gate.set()
        results = await asyncio.gather(blocker, *rest)
        assert [r[0]["reward"] for r in results] == [float(i) for i in range(101)]
        assert fake.batches == [1, 64, 36]  # everything that queued behind the first batch, in two full batches
        assert fake.with_rows == 2  # the first batch had no rows to pass; the other two passed theirs
        await batcher.close(timeout=5)

    asyncio.run(scenario())


# -- draining -----------------------------------------------------------------------------------------------------
def test_ready_turns_false_first_while_accepted_requests_finish(scorer: RewardScorer, index_dir: Path) -> None:
    app = create_app(scorer, ServeConfig(index=str(index_dir)))
    items = [{"rewrite": f"a dog number {i} in a park", "target_ids": ["cap000"]} for i in range(48)]
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        result: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(srv.url + "/v1/rewards",
                                                                             json={"items": items}, timeout=60)))
        worker.start()
        deadline = time.monotonic() + 30
        while app.state.service.metrics.requests_in_progress == 0:  # accepted before the drain begins
            assert time.monotonic() < deadline
            time.sleep(0.005)
        app.state.service.begin_drain()
        r = http.get("/ready")
        assert r.status_code == 503 and "draining" in r.json()["reason"] and r.headers["retry-after"] == "1"
        assert http.get("/health").status_code == 200
        worker.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()["results"]) == 48


@pytest.mark.slow
def test_sigterm_drains_accepted_requests(index_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    env = {**os.environ, "GRAPE_LOG_LEVEL": "info"}
    proc = subprocess.Popen([sys.executable, "-m", "grape_rewards.cli", "serve", "--index", str(index_dir),
                             "--port", str(port), "--device", "cpu", "--max-batch-size", "32"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 120 s"
            time.sleep(0.1)
        n_requests, n_items = 16, 24
        in_flight: list[float] = []

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                tasks = [asyncio.ensure_future(client.post("/v1/rewards", json={"items": [
                    {"rewrite": f"request {r} item {i}: a dog chasing a ball", "target_ids": ["cap002"]}
                    for i in range(n_items)]})) for r in range(n_requests)]
                # SIGTERM once every request is accepted (answered or in progress), while some are still queued.
                while True:
                    metrics = (await client.get("/metrics")).text
                    in_progress = _metric(metrics, "grape_requests_in_progress") - 1  # minus this scrape
                    answered = _metric(metrics, 'grape_requests_total{endpoint="/v1/rewards",status="200"}',
                                       default=0.0)
                    if in_progress + answered >= n_requests:
                        break
                    await asyncio.sleep(0.01)
                in_flight.append(in_progress)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(fire())
        assert in_flight[0] >= 2, "the requests finished before SIGTERM: nothing was left to drain"
        assert [r.status_code for r in responses] == [200] * n_requests
        assert all(len(r.json()["results"]) == n_items for r in responses)
        proc.wait(60)
        assert proc.returncode in (0, -signal.SIGTERM)
        text = Path(log.name).read_text()
        assert "draining: /ready is now false" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


SLOW_SERVE = """
import sys, time
from grape_rewards.cli import main
from grape_rewards.scorer import RewardScorer

score_batch = RewardScorer.score_batch


def stuck_on_slow(self, items, rows=None):
    if any("SLOW" in (item.rewrite or "") for item in items):
        print("slow job on the device", flush=True)  # the test sends SIGTERM only after this line
        time.sleep(3600)  # a device job far longer than drain_timeout_s
    return score_batch(self, items, rows)


RewardScorer.score_batch = stuck_on_slow
sys.exit(main(sys.argv[1:]))
"""


def _serve_subprocess(script: Path, index_dir: Path, port: int, log: Any, *flags: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(script), "serve", "--index", str(index_dir), "--port", str(port),
                             "--device", "cpu", *flags], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRAPE_LOG_LEVEL": "info", "PYTHONPATH": str(Path(__file__).parents[1])})
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 300 s"
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.mark.slow
def test_sigterm_past_drain_timeout_answers_503_and_exits(index_dir: Path, tmp_path: Path) -> None:
    """A request still scoring when drain_timeout_s runs out is answered 503 (JSON, Retry-After: the client retries
    it elsewhere), and the process exits then, not when the device job ends (here: never)."""
    script = tmp_path / "slow_serve.py"
    script.write_text(SLOW_SERVE)
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = _serve_subprocess(script, index_dir, port, log, "--drain-timeout-s", "1")
    url = f"http://127.0.0.1:{port}"
    try:
        result: dict[str, httpx.Response] = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(
            url + "/v1/rewards", json={"items": [{"rewrite": "SLOW dog", "target_ids": ["cap000"]}]}, timeout=120)))
        worker.start()
        deadline = time.monotonic() + 60
        # SIGTERM once the slow batch is on the device: a request still parsed or queued when the drain starts is
        # answered 503 at once and leaves no device job to abandon (a race the full suite hit under load)
        while "slow job on the device" not in Path(log.name).read_text():
            assert time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        worker.join(120)
        r = result["r"]
        assert r.status_code == 503, (r.status_code, r.text)
        assert r.headers["content-type"] == "application/json" and "retry-after" in r.headers
        assert "shutting down" in r.json()["detail"] or "stopped" in r.json()["detail"]
        proc.wait(60)  # before: the process waited for the device job (an hour here)
        assert "abandoning" in Path(log.name).read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_bulk_histogram_exposes_what_a_prometheus_histogram_would():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from grape_rewards.server.metrics import SIM_BUCKETS, BulkHistogram

    values = [-1.0, -0.95, 0.0, 0.1, 0.1000001, 0.55, 1.0, 1.5, -3.0]
    bulk_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("grape_x", "x", SIM_BUCKETS)
    bulk_registry.register(bulk)
    reference = Histogram("grape_x", "x", buckets=SIM_BUCKETS, registry=reference_registry)
    bulk.observe_many(values[:4])
    bulk.observe_many([])
    bulk.observe_many(values[4:])
    for v in values:
        reference.observe(v)

    def lines(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines()
                if "_created" not in line and "_sum" not in line]

    assert lines(bulk_registry) == lines(reference_registry)
    # prometheus_client drops _sum when a bucket bound is negative; the bulk histogram keeps it (sum / count is
    # the step mean of a similarity).
    assert bulk_registry.get_sample_value("grape_x_sum") == pytest.approx(sum(values))


def test_tune_gc_freezes_the_loaded_objects_and_raises_the_young_threshold():
    import gc

    from grape_rewards.server.app import tune_gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        tune_gc(5_000)
        assert gc.get_threshold() == (5_000, 10, 10)
        assert gc.get_freeze_count() > 0
        tune_gc(100)  # never lowers a threshold someone raised
        assert gc.get_threshold()[0] == 5_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_free_port_is_below_the_ports_the_os_hands_out():
    """Ports the OS picks for port 0 can go to the next process that asks (a local Ray starts dozens): free_port
    takes one only ever taken by being asked for."""
    from grape_rewards.server import testing

    low = testing._ephemeral_low()
    ports = {testing.free_port() for _ in range(20)}
    if low - testing.RESERVED_BELOW >= 1000:
        assert all(testing.RESERVED_BELOW <= p < low for p in ports), (ports, low)
    assert len(ports) > 1  # drawn at random: parallel runs do not all try the same one
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
