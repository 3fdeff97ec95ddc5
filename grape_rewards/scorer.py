"""The one code path that turns rewrites into rewards: extract, encode (cached), rank over the corpus, compose.

The CLI's ``score``, the reward service and the in-process adapters all call :class:`RewardScorer`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

from .alarms import ALARM_KEYS, AlarmMonitor
from .corpus.index import CorpusIndex, IndexError_
from .devices import to_device
from .retrievers.base import Retriever, TextInfo
from .rewards.composite import sample_keys, score_sample
from .rewards.config import RewardConfig
from .rewards.format import Extraction, extract_rewrite
from .rewards.rank import default_chunk_elements


class RewardItem(BaseModel):
    """One sample to score: the completion (or an already-extracted rewrite) and where its target is."""

    model_config = ConfigDict(extra="forbid")

    completion: str | None = None
    """The model's response; the rewrite is extracted from it (answer tags, reasoning block, special tokens)."""
    rewrite: str | None = None
    """An already-extracted rewrite; used as is when ``completion`` is not given."""
    target_ids: list[str] = Field(min_length=1)
    excluded_ids: list[str] = Field(default_factory=list)
    reference_id: str | None = None
    """Composed retrieval: the reference image (always excluded from the ranking; fused into the query)."""
    query_id: str | None = None
    original_query: str | None = None
    """The query before rewriting: needed by the relative mode, and scored for comparison."""


def normalize_text(text: str) -> str:
    """Cache key of a text: whitespace collapsed and stripped.

    >>> normalize_text("  a   dog\\n")
    'a dog'
    """
    return " ".join(text.split())  # str.split and re's \s agree on what whitespace is


def group_key(item: RewardItem) -> str:
    """The GRPO group of an item (the query it rewrites): its query_id, else its original query, else its targets.

    >>> group_key(RewardItem(rewrite="a", target_ids=["c1", "c2"]))
    'targets:c1,c2'
    """
    if item.query_id is not None:
        return "id:" + item.query_id
    if item.original_query:
        return "query:" + normalize_text(item.original_query)
    return "targets:" + ",".join(item.target_ids) + ("|" + item.reference_id if item.reference_id else "")


class LRUCache:
    """A small thread-safe LRU map with hit/miss counters."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: object) -> object | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: object, value: object) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class ScoredBatch:
    samples: list[dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)
    """``encode_s``, ``rank_s``, ``total_s`` and cache counts of this batch."""


class RewardScorer:
    """Score rewrites with a retriever over an index, under a reward config. Thread-safe.

    Args:
        cache_size: query embeddings kept (GRPO groups repeat rewrites); original-query ranks keep as many.
        chunk_elements: bound on the query x corpus scores held at once (default: 2^24 on the CPU, 2^26 on a GPU).
        encode_batch_size: texts per encoder call; texts are sorted by length first, so smaller calls pad less
            (on an H200, 1,024 ViT-L/14 rewrites took 21-25 ms as four calls of 256 and 19-30 ms as one call
            across runs: host-bound either way; see benchmarks/results/gpu-h200.md).
    """

    def __init__(self, retriever: Retriever, index: CorpusIndex, config: RewardConfig | None = None,
                 cache_size: int = 65536, chunk_elements: int | None = None,
                 encode_batch_size: int = 256) -> None:
        if index.fingerprint is not None and index.fingerprint != retriever.fingerprint:
            raise IndexError_(
                f"index {index.name} was built with retriever {index.manifest['retriever'].get('spec')!r} "
                f"(fingerprint {index.fingerprint}), not {retriever.spec!r} (fingerprint {retriever.fingerprint}); "
                "mismatched embeddings give meaningless rewards")
        if index.dim != retriever.dim:
            raise IndexError_(f"index {index.name} holds {index.dim}-d embeddings, {retriever.spec!r} makes "
                              f"{retriever.dim}-d ones")
        self.retriever = retriever
        self.index = index
        self.config = config or RewardConfig()
        self.chunk_elements = chunk_elements or default_chunk_elements(index.device)
        self.encode_batch_size = encode_batch_size
        self.embedding_cache = LRUCache(cache_size)
        self.original_rank_cache = LRUCache(cache_size)
        self.alarms = AlarmMonitor(self.config.alarms) if self.config.alarms.enabled else None
        """Reward-hacking alarms over the samples this scorer scores (None when ``config.alarms.enabled`` is off)."""
        self.keys = sample_keys(self.config) + (ALARM_KEYS if self.alarms is not None else ())
        self._lock = threading.Lock()

    # -- validation -----------------------------------------------------------------------------------
    def resolve_rows(self, items: Sequence[RewardItem]) -> tuple[list[list[int]], list[list[int]]]:
        """Corpus rows of each item's targets, and of what its ranking leaves out (exclusions and reference).

        Raises :class:`~grape_rewards.corpus.UnknownIdError` for the first id the index does not hold.
        """
        rows = self.index.rows
        needs_reference = self.retriever.takes_reference
        targets: list[list[int]] = []
        excluded: list[list[int]] = []
        for item in items:
            targets.append(rows(item.target_ids))
            left_out = rows(item.excluded_ids) if item.excluded_ids else []
            if item.reference_id is not None:
                left_out = left_out + rows([item.reference_id])
            elif needs_reference:
                raise ValueError(f"{self.retriever.spec!r} fuses the reference image into the query: every item "
                                 "needs a reference_id")
            excluded.append(left_out)
        return targets, excluded

    def check_ids(self, items: Sequence[RewardItem]) -> None:
        """Raise :class:`~grape_rewards.corpus.UnknownIdError` for the first id the index does not hold."""
        self.resolve_rows(items)

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[TextInfo]]:
        """Embeddings (on the index's device) and token info of texts, through the LRU cache."""
        fp = self.retriever.fingerprint
        keys = [(fp, normalize_text(t)) for t in texts]
        hits: dict[tuple[str, str], tuple[torch.Tensor, TextInfo]] = {}
        missing: dict[str, int] = {}  # text to encode -> its row among the new embeddings
        for key in keys:
            if key in hits or key[1] in missing:
                continue
            hit = self.embedding_cache.get(key)
            if hit is not None:
                hits[key] = hit  # type: ignore[assignment]
            else:
                missing[key[1]] = len(missing)
        if not keys:
            return torch.empty(0, self.retriever.dim, device=self.index.device), []
        new_emb = torch.empty(0, self.retriever.dim, device=self.index.device)
        new_infos: list[TextInfo] = []
        if missing:
            # Cached rows stay on the index's device: no host round trip per request on a GPU.
            new_emb, new_infos = self.retriever.encode_texts_with_info(list(missing),
                                                                       batch_size=self.encode_batch_size)
            new_emb = new_emb.to(self.index.device, torch.float32)
            if self.embedding_cache.capacity > 0:  # rows of a copy: the caller may modify what it gets back
                for text, row, info in zip(missing, new_emb.clone().unbind(0), new_infos):
                    self.embedding_cache.put((fp, text), (row, info))
        if not hits:  # all new (the usual GRPO case with distinct rewrites): one gather, no per-row tensors
            rows = [missing[k[1]] for k in keys]
            if rows != list(range(len(new_emb))):  # repeated texts: gather (indices sent without a GPU sync)
                new_emb = new_emb[to_device(torch.tensor(rows), new_emb.device)]
            return new_emb, [new_infos[r] for r in rows]
        entries = [hits[k] if k in hits else (new_emb[missing[k[1]]], new_infos[missing[k[1]]]) for k in keys]
        return torch.stack([e for e, _ in entries]), [i for _, i in entries]

    def _queries(self, texts: Sequence[str], references: Sequence[str | None]) -> tuple[torch.Tensor, list[TextInfo]]:
        emb, infos = self.encode(texts)
        if self.retriever.takes_reference:
            ref = self.index.vectors([r for r in references if r is not None])
            emb = self.retriever.fuse_queries(emb, ref)
        return emb, infos

    # -- scoring --------------------------------------------------------------------------------------
    def extract(self, item: RewardItem) -> Extraction:
        fmt = self.config.format
        text = item.completion if item.completion is not None else item.rewrite
        return extract_rewrite(text, fmt.answer_tag, fmt.require_answer_tag and item.completion is not None,
                               fmt.max_chars)

    def original_ranks(self, items: Sequence[RewardItem],
                       rows: tuple[list[list[int]], list[list[int]]] | None = None) -> list[int | None]:
        """Rank of each item's original query (cached); None where no original query is given.

        ``rows``: :meth:`resolve_rows` of ``items``, when the caller has it.
        """
        out: list[int | None] = [None] * len(items)
        todo: list[int] = []
        keys = []
        for i, item in enumerate(items):
            key = None
            if item.original_query is not None and item.original_query.strip():
                key = (self.retriever.fingerprint, normalize_text(item.original_query), tuple(item.target_ids),
                       tuple(item.excluded_ids), item.reference_id)
                cached = self.original_rank_cache.get(key)
                if cached is not None:
                    out[i] = int(cached)  # type: ignore[call-overload]
                else:
                    todo.append(i)
            keys.append(key)
        if todo:
            targets, excluded = rows if rows is not None else self.resolve_rows(items)
            emb, _ = self._queries([items[i].original_query or "" for i in todo], [items[i].reference_id for i in todo])
            stats = self.index.rank_rows(emb, [targets[i] for i in todo], [excluded[i] for i in todo],
                                         chunk_elements=self.chunk_elements)
            for j, i in enumerate(todo):
                out[i] = int(stats.rank[j])
                self.original_rank_cache.put(keys[i], out[i])
        return out

    def score_batch(self, items: Sequence[RewardItem]) -> ScoredBatch:
        """Score a batch; every sample gets the same keys (:attr:`keys`)."""
        with self._lock, torch.inference_mode():
            return self._score_batch(items)

    def score(self, items: Sequence[RewardItem]) -> list[dict[str, float]]:
        return self.score_batch(items).samples

    def _score_batch(self, items: Sequence[RewardItem]) -> ScoredBatch:
        scored, extractions = self._rank_and_compose(items)
        if self.alarms is not None:  # the alarms watch every batch; each sample carries their flags
            t0 = time.perf_counter()
            self.alarms.observe([ex.text if ex.scorable else None for ex in extractions],
                                [group_key(item) for item in items], scored.samples,
                                [ex.status == "overlong" for ex in extractions])
            flags = self.alarms.flags()
            for sample in scored.samples:
                sample.update(flags)
            scored.timings["total_s"] += time.perf_counter() - t0
        return scored

    def _rank_and_compose(self, items: Sequence[RewardItem]) -> tuple[ScoredBatch, list[Extraction]]:
        """The scored batch (without alarm flags) and each item's extraction."""
        t0 = time.perf_counter()
        hits0, misses0 = self.embedding_cache.hits, self.embedding_cache.misses
        rows = targets, excluded = self.resolve_rows(items)  # ids looked up once: the scan takes rows
        extractions = [self.extract(item) for item in items]
        scorable = [i for i, ex in enumerate(extractions) if ex.scorable]
        if self.config.relative and any(not (it.original_query or "").strip() for it in items):
            raise ValueError("the relative reward mode needs original_query on every item")
        originals = self.original_ranks(items, rows)
        t1 = time.perf_counter()
        emb, infos = self._queries([extractions[i].text for i in scorable], [items[i].reference_id for i in scorable])
        t2 = time.perf_counter()
        stats = self.index.rank_rows(emb, [targets[i] for i in scorable], [excluded[i] for i in scorable],
                                     chunk_elements=self.chunk_elements)
        t3 = time.perf_counter()
        samples: list[dict[str, float]] = []
        where = {i: j for j, i in enumerate(scorable)}
        # Whole columns to Python at once: one conversion each, not an indexing + .item() per sample and statistic.
        ranks, ns = stats.rank.tolist(), stats.n.tolist()
        target_sims, mean_sims, best_sims = (stats.target_sim.tolist(), stats.mean_sim.tolist(),
                                             stats.best_nontarget_sim.tolist())
        for i, ex in enumerate(extractions):
            j = where.get(i)
            if j is None:  # N depends only on the targets and exclusions
                n = len(self.index) - len(set(targets[i]).union(excluded[i])) + 1
                samples.append(score_sample(self.config, ex, rank=n, n=n, target_sim=0.0, mean_sim=0.0,
                                            best_nontarget_sim=0.0, original_rank=originals[i]))
                continue
            samples.append(score_sample(
                self.config, ex, rank=int(ranks[j]), n=int(ns[j]), target_sim=float(target_sims[j]),
                mean_sim=float(mean_sims[j]), best_nontarget_sim=float(best_sims[j]),
                num_tokens=infos[j].num_tokens, truncated=infos[j].truncated, original_rank=originals[i]))
        t4 = time.perf_counter()
        timings = {"encode_s": (t2 - t1) + (t1 - t0), "rank_s": t3 - t2, "total_s": t4 - t0,
                   "cache_hits": float(self.embedding_cache.hits - hits0),
                   "cache_misses": float(self.embedding_cache.misses - misses0)}
        return ScoredBatch(samples, timings), extractions
