"""Prometheus metrics of the reward service, in a registry of its own (several apps can live in one process).

Names (all prefixed ``grape_``):

- ``requests_total{endpoint,status}``, ``request_seconds{endpoint}``, ``requests_in_progress``
- ``rejected_total{reason}``: queue_full, not_ready, bad_request, unauthorized, too_large (each 0 from the start)
- ``batch_items`` / ``batch_requests``: samples and requests per device batch (> 1 means coalescing works)
- ``queue_wait_seconds``: enqueue to batch start; ``encode_seconds`` / ``score_seconds`` / ``batch_seconds``:
  the device work of each batch (extract + encode, rank + compose, whole batch)
- ``queue_items``: samples waiting now
- ``cache_hits_total{cache}`` / ``cache_misses_total{cache}`` / ``cache_hit_ratio{cache}`` / ``cache_entries{cache}``
  for the ``embedding`` and ``original_rank`` caches
- ``samples_total``, ``reward`` (histogram), score inflation per sample: ``target_sim``, ``mean_sim``, ``margin``
  and ``inflation_gap`` histograms (their ``_sum / _count`` over a window is the step mean),
  ``recall_hits_total{k}``, ``format_failures_total``, ``truncated_total``, and ``batch_stat{stat}``: the
  inflation summary of the latest batch
- ``alarm{name}``: 1 while a reward-hacking alarm is on (:mod:`grape_rewards.alarms`; 0 while off or disabled),
  ``alarm_stat{stat}``: the window statistics the alarms read (NaN until their windows are full, or with the
  alarms disabled). Every name and stat is exposed from the start, so a dashboard panel has its series at once.
- ``ready``: 1 when the index is loaded and the service accepts work
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..alarms import ALARMS, STATS
from ..rewards.inflation import summary_names

if TYPE_CHECKING:
    from ..scorer import RewardScorer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REJECT_REASONS = ("queue_full", "not_ready", "bad_request", "unauthorized", "too_large")
"""The reasons of ``grape_rejected_total``."""
ENDPOINTS = ("/get_reward", "/v1/rewards", "/retrieve", "/health", "/ready", "/info", "/metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
SIM_BUCKETS = tuple(round(-1.0 + 0.1 * i, 1) for i in range(21))
REWARD_BUCKETS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0)


class _CacheCollector(Collector):
    """Reads the scorer's LRU counters at scrape time (no work on the hot path)."""

    def __init__(self) -> None:
        self.scorer: RewardScorer | None = None

    def collect(self) -> Iterable[Any]:
        hits = CounterMetricFamily("grape_cache_hits", "Cache hits", labels=["cache"])
        misses = CounterMetricFamily("grape_cache_misses", "Cache misses", labels=["cache"])
        ratio = GaugeMetricFamily("grape_cache_hit_ratio", "Cache hits / lookups since start", labels=["cache"])
        entries = GaugeMetricFamily("grape_cache_entries", "Entries held", labels=["cache"])
        if self.scorer is not None:
            for name, cache in (("embedding", self.scorer.embedding_cache),
                                ("original_rank", self.scorer.original_rank_cache)):
                h, m = cache.hits, cache.misses
                hits.add_metric([name], h)
                misses.add_metric([name], m)
                ratio.add_metric([name], h / (h + m) if h + m else 0.0)
                entries.add_metric([name], len(cache))
        yield from (hits, misses, ratio, entries)


class _AlarmCollector(Collector):
    """Reads the scorer's reward-hacking alarms at scrape time."""

    def __init__(self) -> None:
        self.scorer: RewardScorer | None = None

    def collect(self) -> Iterable[Any]:
        alarm = GaugeMetricFamily("grape_alarm", "1 while a reward-hacking alarm is on", labels=["name"])
        stat = GaugeMetricFamily("grape_alarm_stat", "Window statistics read by the alarms (NaN until a window is "
                                 "full)", labels=["stat"])
        monitor = self.scorer.alarms if self.scorer is not None else None
        active = dict(monitor.active) if monitor is not None else {}
        stats = dict(monitor.stats) if monitor is not None else {}
        for name in ALARMS:
            alarm.add_metric([name], 1.0 if active.get(name) else 0.0)
        for key in STATS:
            stat.add_metric([key], stats.get(key, math.nan))
        yield from (alarm, stat)


class BulkHistogram(Collector):
    """A Prometheus histogram filled a whole batch at a time (one vectorised bucket count, not one locked
    ``observe`` per sample on the event loop), exposed at scrape time like ``prometheus_client.Histogram``."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: Sequence[float]) -> None:
        if not len(values):
            return
        v = np.asarray(values, dtype=np.float64)
        counts = np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.sum += float(v.sum())

    def collect(self) -> Iterable[Any]:
        with self._lock:
            cumulative, total = np.cumsum(self.counts).tolist(), self.sum
        family = Metric(self.name, self.documentation, "histogram")  # with _count and _sum even for negative
        for bound, count in zip([*map(floatToGoString, self.bounds.tolist()), "+Inf"], cumulative):  # buckets
            family.add_sample(self.name + "_bucket", {"le": bound}, count)
        family.add_sample(self.name + "_count", {}, cumulative[-1])
        family.add_sample(self.name + "_sum", {}, total)
        yield family


class ServiceMetrics:
    """Every metric of one app, in its own :class:`prometheus_client.CollectorRegistry`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("grape_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("grape_request_seconds", "HTTP request latency", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.requests_in_progress = 0
        """Updated per request as a plain int (a Gauge's inc/dec costs a lock and a check); read at scrape time."""
        self.in_progress = Gauge("grape_requests_in_progress", "HTTP requests being handled", registry=r)
        self.in_progress.set_function(lambda: self.requests_in_progress)
        self.rejected = Counter("grape_rejected", "Requests refused before scoring", ["reason"], registry=r)
        for reason in REJECT_REASONS:  # every series from the start (a dashboard's rate() needs it before the first)
            self.rejected.labels(reason=reason)
        self.batch_items = Histogram("grape_batch_items", "Samples per device batch", buckets=SIZE_BUCKETS,
                                     registry=r)
        self.batch_requests = Histogram("grape_batch_requests", "Requests coalesced into one device batch",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.queue_wait = BulkHistogram("grape_queue_wait_seconds", "Time from enqueue to the start of its batch",
                                        LATENCY_BUCKETS)
        self.encode_seconds = Histogram("grape_encode_seconds", "Extraction + query encoding time per batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.score_seconds = Histogram("grape_score_seconds", "Rank + reward composition time per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram("grape_batch_seconds", "Device time per batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.batch_failures = Counter("grape_batch_failures", "Batches that raised and were retried per request",
                                      registry=r)
        self.queue_items = Gauge("grape_queue_items", "Samples waiting for the device worker", registry=r)
        """Read at scrape time from the batcher's own count (it points the gauge there when it starts)."""
        self.samples = Counter("grape_samples", "Samples scored", registry=r)
        self.reward = BulkHistogram("grape_reward", "Reward per sample", REWARD_BUCKETS)
        self.target_sim = BulkHistogram("grape_target_sim", "Similarity of the rewrite to its best target",
                                        SIM_BUCKETS)
        self.mean_sim = BulkHistogram("grape_mean_sim", "Mean similarity of the rewrite to the corpus", SIM_BUCKETS)
        self.margin = BulkHistogram("grape_margin", "Target similarity minus best non-target similarity",
                                    SIM_BUCKETS)
        self.inflation_gap = BulkHistogram("grape_inflation_gap", "Target similarity minus mean corpus similarity",
                                           SIM_BUCKETS)
        for bulk in (self.queue_wait, self.reward, self.target_sim, self.mean_sim, self.margin, self.inflation_gap):
            r.register(bulk)
        self.recall_hits = Counter("grape_recall_hits", "Samples whose target ranks within k", ["k"], registry=r)
        self.format_failures = Counter("grape_format_failures", "Samples with an empty or missing rewrite",
                                       registry=r)
        self.truncated = Counter("grape_truncated", "Rewrites cut to the retriever's context length", registry=r)
        self.batch_stat = Gauge("grape_batch_stat", "Score-inflation summary of the latest batch", ["stat"],
                                registry=r)
        self.ready = Gauge("grape_ready", "1 when the service accepts work", registry=r)
        self.info = Info("grape_service", "Retriever, index and version served", registry=r)
        self._caches = _CacheCollector()
        r.register(self._caches)
        self._alarms = _AlarmCollector()
        r.register(self._alarms)
        self._recall_children = {k: self.recall_hits.labels(k=str(k)) for k in (1, 5, 10)}
        self._request_children: dict[tuple[str, int], Any] = {}
        self._latency_children = {e: self.request_seconds.labels(endpoint=e) for e in (*ENDPOINTS, "other")}

    def attach(self, scorer: RewardScorer, info: dict[str, str]) -> None:
        """Start reporting ``scorer``'s caches and describe what is served. Every ``batch_stat`` series the
        scorer's batches will report exists from now on, NaN until the first batch (a dashboard panel has a
        series to draw from the start)."""
        self._caches.scorer = scorer
        self._alarms.scorer = scorer
        self.info.info(info)
        for stat in summary_names(graded=scorer.config.rank_mode != "hard"):
            self.batch_stat.labels(stat=stat).set(float("nan"))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(endpoint=endpoint, status=str(status))
        child.inc()
        self._latency_children[endpoint].observe(seconds)

    def observe_batch(self, num_requests: int, samples: Sequence[dict[str, float]], waits: Sequence[float],
                      timings: dict[str, float], summary: dict[str, float]) -> None:
        """Record one device batch: its size, waits, timings and the statistics of its samples."""
        self.batch_items.observe(len(samples))
        self.batch_requests.observe(num_requests)
        self.queue_wait.observe_many(waits)
        self.encode_seconds.observe(timings.get("encode_s", 0.0))
        self.score_seconds.observe(timings.get("rank_s", 0.0))
        self.batch_seconds.observe(timings.get("batch_s", timings.get("total_s", 0.0)))
        self.samples.inc(len(samples))
        self.reward.observe_many([s["reward"] for s in samples])
        # Samples without a rewrite carry placeholder similarities: left out of the similarity statistics.
        scored = [s for s in samples if s["scored"] == 1.0]
        target = [s["target_sim"] for s in scored]
        mean = [s["mean_sim"] for s in scored]
        self.target_sim.observe_many(target)
        self.mean_sim.observe_many(mean)
        self.margin.observe_many([s["margin"] for s in scored])
        self.inflation_gap.observe_many([t - m for t, m in zip(target, mean)])
        for k, child in self._recall_children.items():
            hits = sum(s[f"recall_at_{k}"] == 1.0 for s in scored)
            if hits:
                child.inc(hits)
        if len(scored) < len(samples):
            self.format_failures.inc(len(samples) - len(scored))
        truncated = sum(s["truncated"] == 1.0 for s in scored)
        if truncated:
            self.truncated.inc(truncated)
        for stat, value in summary.items():
            self.batch_stat.labels(stat=stat).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
