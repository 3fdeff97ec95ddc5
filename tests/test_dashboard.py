"""The Grafana dashboard and its Prometheus scrape config (every metric the dashboard queries exists on /metrics),
and the same series as a PNG from a scored JSONL (``grape-rewards series-report``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

from grape_rewards.cli import main as cli_main
from grape_rewards.corpus import CorpusIndex
from grape_rewards.demo import data_path
from grape_rewards.retrievers import TextEmbedder
from grape_rewards.rewards import RewardConfig
from grape_rewards.rewards.config import AlarmConfig
from grape_rewards.rewards.inflation import summary_names
from grape_rewards.scorer import RewardScorer
from grape_rewards.server import ServeConfig, create_app
from grape_rewards.server.testing import ServerThread

GRAFANA = Path(__file__).resolve().parents[1] / "examples" / "grafana"
METRIC = re.compile(r"\b(grape_[a-z0-9_]+)(\{[^}]*\})?")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ", re.M)


@pytest.fixture(scope="module")
def index_dir(demo_index_dir: Path) -> Path:
    return demo_index_dir


def dashboard_queries() -> list[str]:
    dashboard = json.loads((GRAFANA / "grape-rewards.json").read_text(encoding="utf-8"))
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_every_metric_the_dashboard_queries_is_on_metrics(minilm: TextEmbedder, index_dir: Path) -> None:
    queries = dashboard_queries()
    wanted = ("grape_reward", 'stat="mean_rank"', "grape_recall_hits", "grape_target_sim", "grape_mean_sim",
              "grape_margin", "grape_alarm", "grape_request_seconds", "grape_batch_items", "grape_queue_items",
              "grape_cache_hits")  # what the issue asks the dashboard to show
    missing = [w for w in wanted if not any(w in q for q in queries)]
    assert not missing, missing
    scorer = RewardScorer(minilm, CorpusIndex.load(index_dir), RewardConfig(alarms=AlarmConfig(window=16)))
    items = [{"rewrite": f"a dog number {i} catches a frisbee", "target_ids": ["cap000"]} for i in range(20)]
    with ServerThread(create_app(scorer, ServeConfig(index=str(index_dir)))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/rewards", json={"items": items}).status_code == 200
        assert http.post("/get_reward", json={"query": ["<answer></answer>"], "labels": ['{"target_ids": ["cap000"]}']}
                         ).status_code == 200  # a format failure
        assert http.post("/v1/rewards", json={"items": "nope"}).status_code == 422  # a rejection
        exposed: dict[str, list[str]] = {}
        for name, labels in SAMPLE.findall(http.get("/metrics").text):
            exposed.setdefault(name, []).append(labels)
    for query in queries:
        for name, selector in METRIC.findall(query):
            assert name in exposed, f"{name} (queried by {query!r}) is not on /metrics"
            for label, value in re.findall(r'(\w+)="([^"]*)"', selector):  # exact label matchers
                assert any(f'{label}="{value}"' in labels for labels in exposed[name]), (name, label, value)


def test_prometheus_scrape_config_points_at_metrics() -> None:
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]


def test_series_report_from_a_scored_jsonl(index_dir: Path, tmp_path: Path) -> None:
    """Score healthy rows then garbage completions (alarm window 16), and plot: the PNG is written, and its numbers
    show the reward falling and the format_failures alarm turning on."""
    captions = [json.loads(line) for line in data_path("captions.jsonl").read_text().splitlines()]
    rows = [{"completion": f"<answer>{c['text']}</answer>", "target_ids": [c["id"]]} for c in captions[:48]]
    rows += [{"completion": "<think>hmm", "target_ids": [c["id"]]} for c in captions[48:96]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "reward.yaml").write_text("alarms: {window: 16}\n", encoding="utf-8")
    assert cli_main(["score", "--index", str(index_dir), "--input", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "scored.jsonl"), "--reward-config", str(tmp_path / "reward.yaml"),
                     "--batch-size", "16", "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "report" / "series.png"
    assert cli_main(["series-report", "--scored", str(tmp_path / "scored.jsonl"), "--out", str(out),
                     "--window", "16"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = json.loads(out.with_suffix(".json").read_text())["series"]
    assert series["end"] == list(range(16, 97, 16))
    assert series["alarm_format_failures"][:3] == [0.0] * 3 and series["alarm_format_failures"][-1] == 1.0
    assert min(series["reward"][:3]) > 0.0 and series["reward"][-1] == -1.0
    assert series["format_failure"][-1] == 1.0 and series["target_sim"][-1] is None  # no rewrite: no similarity
    assert cli_main(["series-report", "--scored", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 2  # not scored


def test_the_labelled_series_the_dashboard_queries_are_on_metrics_from_the_start(minilm: TextEmbedder,
                                                                                index_dir: Path) -> None:
    """Before any rejection and before an alarm window fills, /metrics already has a grape_rejected_total series per
    reason (0) and a grape_alarm_stat series per statistic (NaN), so the panels that query them have data at once."""
    from grape_rewards.alarms import ALARMS, STATS

    reasons = ("queue_full", "not_ready", "bad_request", "unauthorized", "too_large")  # as /metrics documents them
    scorer = RewardScorer(minilm, CorpusIndex.load(index_dir), RewardConfig())
    with ServerThread(create_app(scorer, ServeConfig(index=str(index_dir)))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        text = http.get("/metrics").text
    series = {name + labels: value for name, labels, value in re.findall(r"^(grape_\w+)(\{[^}]*\})? (\S+)$", text,
                                                                        re.M)}
    assert {f'grape_rejected_total{{reason="{r}"}}': "0.0" for r in reasons}.items() <= series.items()
    assert {f'grape_alarm_stat{{stat="{s}"}}': "NaN" for s in STATS}.items() <= series.items()
    assert {f'grape_alarm{{name="{a}"}}': "0.0" for a in ALARMS}.items() <= series.items()
    assert {f'grape_batch_stat{{stat="{s}"}}': "NaN" for s in summary_names()}.items() <= series.items()
    assert 'grape_batch_stat{stat="mean_graded_rank"}' not in series  # the plain rank has no graded rank
    for query in dashboard_queries():  # every queried series, with its exact label values, before any request
        for name, selector in METRIC.findall(query):
            keys = [key for key in series if key == name or key.startswith(name + "{")
                    or key.startswith(name + "_bucket{") or key.startswith(name + "_count")]
            assert keys, name
            for label, value in re.findall(r'(\w+)="([^"]*)"', selector):
                assert any(f'{label}="{value}"' in key for key in keys), (name, label, value)


def test_a_graded_reward_reports_its_mean_graded_rank_from_the_start(minilm: TextEmbedder, index_dir: Path) -> None:
    scorer = RewardScorer(minilm, CorpusIndex.load(index_dir), RewardConfig(rank_mode="margin"))
    with ServerThread(create_app(scorer, ServeConfig(index=str(index_dir)))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        assert 'grape_batch_stat{stat="mean_graded_rank"} NaN' in http.get("/metrics").text
        assert http.post("/v1/rewards", json={"items": [{"rewrite": "a dog catches a frisbee",
                                                         "target_ids": ["cap000"]}]}).status_code == 200
        line = next(x for x in http.get("/metrics").text.splitlines()
                    if x.startswith('grape_batch_stat{stat="mean_graded_rank"}'))
    assert 1.0 <= float(line.split()[-1]) <= 2.0  # rank 1 with a margin: a graded rank in (1, 2]
