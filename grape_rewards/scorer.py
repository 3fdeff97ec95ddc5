"""The one code path that turns rewrites into rewards: load, validate, extract, encode (cached), rank, compose.

The CLI's ``score``, the reward service and the in-process adapters all call :class:`RewardScorer`: loaded from an
index folder by :meth:`RewardScorer.from_index`, items read by :func:`read_item` and checked by
:meth:`RewardScorer.validate` (the same rules and messages everywhere), then scored.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .alarms import ALARM_KEYS, AlarmMonitor
from .corpus.index import CorpusIndex, CorpusIndexError, UnknownIdError, read_manifest
from .corpus.rank import NO_EXTRAS, RankStats, ScanExtras, default_chunk_elements
from .devices import to_device
from .jsonl import json_kind
from .labels import ids_as_strings
from .retrievers.base import Retriever, TextInfo
from .rewards.composite import sample_keys, score_sample
from .rewards.config import RewardConfig
from .rewards.format import Extraction, extract_rewrite
from .rewards.graded_rank import graded_rank


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

    _ids_as_strings = field_validator("target_ids", "excluded_ids", mode="before")(ids_as_strings)
    """A bare id (``"img_1"``) or integer ids are accepted, as in labels."""

    @model_validator(mode="after")
    def _has_text(self) -> RewardItem:
        if self.completion is None and self.rewrite is None:
            raise ValueError("give 'completion' (the model's response) or 'rewrite'")
        return self


ItemRows = tuple[list[list[int]], list[list[int]]]
"""Corpus rows of a batch's targets and of what each ranking leaves out (exclusions and reference)."""


class ItemError(ValueError):
    """An item that cannot be scored; the message names the item and what is wrong with it."""


def read_item(raw: Any, where: str = "item") -> RewardItem:
    """The :class:`RewardItem` a JSON object describes; otherwise an :class:`ItemError` naming ``where`` and each
    problem (an unknown or misspelt field, a missing target, no text).

    >>> read_item({"rewrite": "a dog", "target_ids": "c1"}).target_ids
    ['c1']
    >>> read_item({"text": "a dog", "target_ids": ["c1"]}, "items[0]")
    Traceback (most recent call last):
    ...
    grape_rewards.scorer.ItemError: items[0].text: Extra inputs are not permitted
    """
    if not isinstance(raw, dict):
        raise ItemError(f"{where} must be an object, got {json_kind(raw)}")
    try:
        return RewardItem.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = "".join(f".{part}" for part in e["loc"])
            error = e.get("ctx", {}).get("error") if e["type"] == "value_error" else None
            problems.append(f"{where}{loc}: {error if error is not None else e['msg']}")
        raise ItemError("; ".join(problems)) from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, where: str, max_chars: int) -> str:
    """A text that reaches the encoder, cut to ``max_chars`` characters; a lone UTF-16 surrogate (not Unicode:
    no tokenizer can encode it) is refused with an :class:`ItemError` naming ``where``.

    >>> check_text("a dog", "queries[0]", 3)
    'a d'
    >>> check_text("a\\ud800", "queries[0]", 100)
    Traceback (most recent call last):
    ...
    grape_rewards.scorer.ItemError: queries[0]: a lone UTF-16 surrogate (U+D800) at character 1 ...
    """
    if not text.isascii():
        bad = _SURROGATE.search(text)
        if bad is not None:
            raise ItemError(f"{where}: a lone UTF-16 surrogate (U+{ord(bad.group()):04X}) at character "
                            f"{bad.start()} is not valid Unicode; send UTF-8 text")
    return text if len(text) <= max_chars else text[:max_chars]


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


def approx_bytes(obj: object) -> int:
    """Memory held by a cache key or value: strings, tensors and tuples of them counted, small scalars ~nothing.

    >>> approx_bytes(("fp", "a dog")) > approx_bytes(("fp", "")), approx_bytes(torch.zeros(8))
    (True, 32)
    """
    if isinstance(obj, str):
        return sys.getsizeof(obj)
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, tuple):
        return sum(approx_bytes(x) for x in obj) + 8 * len(obj)
    return 32


class LRUCache:
    """A small thread-safe LRU map with hit/miss counters, bounded by entries and by bytes (:func:`approx_bytes`
    of keys and values: the keys are client texts, so an entry count alone does not bound memory)."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: object) -> object | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key][0]
            self.misses += 1
            return None

    def put(self, key: object, value: object) -> None:
        if self.capacity <= 0:
            return
        size = approx_bytes(key) + approx_bytes(value) if self.max_bytes is not None else 0
        if self.max_bytes is not None and size > self.max_bytes:
            return  # larger than the whole cache: not kept
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._data[key] = (value, size)
            self.nbytes += size
            while len(self._data) > self.capacity or (self.max_bytes is not None and self.nbytes > self.max_bytes):
                _, (_, dropped) = self._data.popitem(last=False)
                self.nbytes -= dropped

    def __len__(self) -> int:
        return len(self._data)


def scan_extras(config: RewardConfig) -> ScanExtras:
    """What the corpus scan must gather for ``config``'s rank mode (nothing more for the plain rank).

    >>> scan_extras(RewardConfig(rank_mode="margin")).neighbours, scan_extras(RewardConfig()).wanted
    (True, False)
    """
    if config.rank_mode == "margin":
        return ScanExtras(neighbours=True)
    if config.rank_mode == "soft":
        return ScanExtras(soft_temperature=config.rank_temperature)
    return NO_EXTRAS


def graded_statistics(stats: RankStats) -> list[dict[str, float]]:
    """Per query, the graded-rank statistics ``stats`` carries, as keyword arguments of
    :func:`~grape_rewards.rewards.composite.score_sample` (empty dicts for a plain scan)."""
    columns = {name: getattr(stats, name) for name in ("gap_above", "gap_below", "soft_count")}
    lists = {name: values.tolist() for name, values in columns.items() if values is not None}
    return [{name: float(values[j]) for name, values in lists.items()} for j in range(len(stats.rank))]


@dataclass
class ScoredBatch:
    samples: list[dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)
    """``encode_s`` (the rewrites' encoding), ``rank_s`` (their rank scan), ``original_s`` (extraction and the
    original queries' ranks), ``total_s`` and the cache counts of this batch."""


def load_retriever_and_index(index_dir: str | Path, retriever: str | Retriever | None = None,
                             **retriever_overrides: Any) -> tuple[Retriever, CorpusIndex]:
    """The retriever an index folder's manifest names (or ``retriever``, a spec or a loaded one) and the index, loaded
    on the retriever's device and refused unless its fingerprint matches."""
    if not isinstance(retriever, Retriever):
        from .retrievers import create_retriever

        spec = retriever or read_manifest(index_dir).get("retriever", {}).get("spec")
        if not spec:
            raise CorpusIndexError(f"index {index_dir} does not name its retriever; pass one (--retriever)")
        retriever = create_retriever(spec, **retriever_overrides)
    index = CorpusIndex.load(index_dir, device=retriever.device, expected_fingerprint=retriever.fingerprint,
                             expected_spec=retriever.spec)
    return retriever, index


class RewardScorer:
    """Score rewrites with a retriever over an index, under a reward config. Thread-safe.

    Args:
        cache_size: query embeddings kept (GRPO groups repeat rewrites); original-query ranks keep as many.
        cache_bytes: most bytes each of the two caches holds (keys are texts; None: bounded by entries only).
        chunk_elements: bound on the query x corpus scores held at once (default: 2^24 on the CPU, 2^26 on a GPU).
        encode_batch_size: texts per encoder call; texts are sorted by length first, so smaller calls pad less
            (measured in benchmarks/results/gpu-h200.md).
        max_text_chars: an extracted rewrite longer than this is cut (after extraction, so it stays ``overlong``;
            far past any retriever's context, so its score is unchanged) before it is encoded and cached.
    """

    def __init__(self, retriever: Retriever, index: CorpusIndex, config: RewardConfig | None = None,
                 cache_size: int = 65536, chunk_elements: int | None = None,
                 encode_batch_size: int = 256, cache_bytes: int | None = 512 * 1024 * 1024,
                 max_text_chars: int = 20000) -> None:
        if index.fingerprint is not None and index.fingerprint != retriever.fingerprint:
            raise CorpusIndexError(
                f"index {index.name} was built with retriever {index.manifest['retriever'].get('spec')!r} "
                f"(fingerprint {index.fingerprint}), not {retriever.spec!r} (fingerprint {retriever.fingerprint}); "
                "mismatched embeddings give meaningless rewards")
        if index.dim != retriever.dim:
            raise CorpusIndexError(f"index {index.name} holds {index.dim}-d embeddings, {retriever.spec!r} makes "
                                   f"{retriever.dim}-d ones")
        self.retriever = retriever
        self.index = index
        self.config = config or RewardConfig()
        self.scan_extras = scan_extras(self.config)
        self.chunk_elements = chunk_elements or default_chunk_elements(index.device)
        self.encode_batch_size = encode_batch_size
        self.max_text_chars = max_text_chars
        self.embedding_cache = LRUCache(cache_size, cache_bytes)
        self.original_rank_cache = LRUCache(cache_size, cache_bytes)
        self.alarms = AlarmMonitor(self.config.alarms) if self.config.alarms.enabled else None
        """Reward-hacking alarms over the samples this scorer scores (None when ``config.alarms.enabled`` is off)."""
        self.keys = sample_keys(self.config) + (ALARM_KEYS if self.alarms is not None else ())
        self._lock = threading.Lock()

    @classmethod
    def from_index(cls, index_dir: str | Path, config: RewardConfig | None = None, *,
                   retriever: str | Retriever | None = None, scorer_options: dict[str, Any] | None = None,
                   **retriever_overrides: Any) -> RewardScorer:
        """Load a scorer from an index folder: the retriever its manifest names (or ``retriever``, a spec or a loaded
        one), then the index, on the retriever's device, refused unless its fingerprint matches.

        ``retriever_overrides`` go to :func:`~grape_rewards.retrievers.create_retriever` (``device``, ``dtype``,
        ``fusion``, ``image_weight``); ``scorer_options`` to the constructor (``cache_size``, ``max_text_chars``...).
        """
        retriever, index = load_retriever_and_index(index_dir, retriever, **retriever_overrides)
        return cls(retriever, index, config, **(scorer_options or {}))

    # -- validation -----------------------------------------------------------------------------------
    def validate(self, items: Sequence[RewardItem], where: str = "items[{}]",
                 completion_where: str | None = None) -> ItemRows:
        """Check that every item can be scored; return their corpus rows (for :meth:`score_batch`).

        Raises :class:`ItemError` for the first item naming an id the index lacks, lacking the reference image a
        composed retriever fuses, or (relative mode) lacking its original query. ``where`` formats an item's
        position into its name, e.g. ``"labels[{}]"``; ``completion_where`` names the completion when it came from
        elsewhere (OpenRLHF's ``"query[{}]"``).
        """
        targets: list[list[int]] = []
        excluded: list[list[int]] = []
        for i, item in enumerate(items):
            t, e = self.validate_item(item, where.format(i),
                                      completion_where.format(i) if completion_where is not None else None)
            targets.append(t)
            excluded.append(e)
        return targets, excluded

    def validate_item(self, item: RewardItem, where: str,
                      completion_where: str | None = None) -> tuple[list[int], list[int]]:
        """:meth:`validate` of one item named ``where`` (e.g. ``"rewrites.jsonl:7: row"``): its rows."""
        try:
            (t,), (e,) = self.resolve_rows([item])
        except UnknownIdError as exc:
            raise ItemError(f"{where}: {exc}; the training data names an item the index does not hold") from None
        except ValueError as exc:
            raise ItemError(f"{where}: {exc}") from None
        for name in ("completion", "rewrite", "original_query"):
            text = getattr(item, name)
            if text is not None:
                named = completion_where if name == "completion" and completion_where else f"{where}.{name}"
                check_text(text, named, len(text))
        if self.config.relative and not (item.original_query or "").strip():
            raise ItemError(f"{where}: the relative reward mode needs original_query (in the label) for every "
                            "sample")
        return t, e

    def resolve_rows(self, items: Sequence[RewardItem]) -> ItemRows:
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
        """The rewrite of an item (from its completion, else its rewrite), cut to :attr:`max_text_chars`."""
        fmt = self.config.format
        text = item.completion if item.completion is not None else item.rewrite
        ex = extract_rewrite(text, fmt.answer_tag, fmt.require_answer_tag and item.completion is not None,
                             fmt.max_chars)
        keep = max(self.max_text_chars, fmt.max_chars + 1)  # a cut rewrite stays overlong
        return Extraction(ex.text[:keep], ex.status) if ex.scorable and len(ex.text) > keep else ex

    def original_ranks(self, items: Sequence[RewardItem], rows: ItemRows | None = None) -> list[float | None]:
        """Rank of each item's original query (cached), graded as the config's rank mode grades it; None where no
        original query is given.

        ``rows``: :meth:`resolve_rows` of ``items``, when the caller has it.
        """
        out: list[float | None] = [None] * len(items)
        todo: list[int] = []
        keys = []
        for i, item in enumerate(items):
            key = None
            if item.original_query is not None and item.original_query.strip():
                original = item.original_query[:self.max_text_chars]  # every text reaching the encoder is bounded
                key = (self.retriever.fingerprint, normalize_text(original), tuple(item.target_ids),
                       tuple(item.excluded_ids), item.reference_id)
                cached = self.original_rank_cache.get(key)
                if cached is not None:
                    out[i] = float(cached)  # type: ignore[arg-type]
                else:
                    todo.append(i)
            keys.append(key)
        if todo:
            targets, excluded = rows if rows is not None else self.resolve_rows(items)
            emb, _ = self._queries([(items[i].original_query or "")[:self.max_text_chars] for i in todo],
                                   [items[i].reference_id for i in todo])
            stats = self.index.rank_rows(emb, [targets[i] for i in todo], [excluded[i] for i in todo],
                                         chunk_elements=self.chunk_elements, extras=self.scan_extras)
            ranks, ns, graded = stats.rank.tolist(), stats.n.tolist(), graded_statistics(stats)
            for j, i in enumerate(todo):
                out[i] = graded_rank(self.config.rank_mode, int(ranks[j]), int(ns[j]),
                                     temperature=self.config.rank_temperature, **graded[j])
                self.original_rank_cache.put(keys[i], out[i])
        return out

    def score_batch(self, items: Sequence[RewardItem], rows: ItemRows | None = None) -> ScoredBatch:
        """Score a batch; every sample gets the same keys (:attr:`keys`).

        ``rows``: what :meth:`validate` returned for ``items`` (validated here when not given).
        """
        if rows is None:
            rows = self.validate(items)
        with self._lock, torch.inference_mode():
            return self._score_batch(items, rows)

    def score(self, items: Sequence[RewardItem]) -> list[dict[str, float]]:
        return self.score_batch(items).samples

    def _score_batch(self, items: Sequence[RewardItem], rows: ItemRows) -> ScoredBatch:
        scored, extractions = self._rank_and_compose(items, rows)
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

    def _rank_and_compose(self, items: Sequence[RewardItem], rows: ItemRows) -> tuple[ScoredBatch, list[Extraction]]:
        """The scored batch (without alarm flags) and each item's extraction."""
        t0 = time.perf_counter()
        hits0, misses0 = self.embedding_cache.hits, self.embedding_cache.misses
        targets, excluded = rows  # ids looked up once (by validate): the scan takes rows
        extractions = [self.extract(item) for item in items]
        scorable = [i for i, ex in enumerate(extractions) if ex.scorable]
        originals = self.original_ranks(items, rows)
        t1 = time.perf_counter()
        emb, infos = self._queries([extractions[i].text for i in scorable], [items[i].reference_id for i in scorable])
        t2 = time.perf_counter()
        stats = self.index.rank_rows(emb, [targets[i] for i in scorable], [excluded[i] for i in scorable],
                                     chunk_elements=self.chunk_elements, extras=self.scan_extras)
        t3 = time.perf_counter()
        samples: list[dict[str, float]] = []
        where = {i: j for j, i in enumerate(scorable)}
        # Whole columns to Python at once: one conversion each, not an indexing + .item() per sample and statistic.
        ranks, ns = stats.rank.tolist(), stats.n.tolist()
        target_sims, mean_sims, best_sims = (stats.target_sim.tolist(), stats.mean_sim.tolist(),
                                             stats.best_nontarget_sim.tolist())
        graded = graded_statistics(stats)
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
                num_tokens=infos[j].num_tokens, truncated=infos[j].truncated, original_rank=originals[i], **graded[j]))
        t4 = time.perf_counter()
        timings = {"encode_s": t2 - t1, "rank_s": t3 - t2, "original_s": t1 - t0, "total_s": t4 - t0,
                   "cache_hits": float(self.embedding_cache.hits - hits0),
                   "cache_misses": float(self.embedding_cache.misses - misses0)}
        return ScoredBatch(samples, timings), extractions
