"""Recall@K of a benchmark's original queries and of rewrite files, side by side.

The benchmark's corpus is embedded into an index (or a prebuilt one is loaded, with its retriever
fingerprint checked); queries are encoded (the original text, or each rewrite file's rewrite, which
falls back to the original when the file lacks the query or its rewrite is empty), and each query's
target is ranked exactly over the whole corpus with :meth:`CorpusIndex.rank`.

Text-to-image benchmarks report Recall@{1,5,10} and their mean. CIRR (``shared/protocols.md``) reports
Recall@{1,5,10,50} over the split's whole gallery with the query's reference image removed,
Recall_subset@{1,2,3} over ``img_set.members`` minus the reference, and ``avg`` = (R@5 + R_subset@1) / 2
(the average CIRR papers report). Composed queries fuse the reference image's embedding, read from the
index, with the text (the retriever's fusion). The CIRR test split has no labels: only the two
submission files of the CIRR server are written.

An ensemble (:func:`evaluate_ensemble`: several retrievers, one index each, over the same corpus ids, as the
ensemble reward of :mod:`grape_rewards.ensemble`) is evaluated once per retriever, each ranking over its own
index, and combined per query the way the ensemble reward combines rank parts
(:func:`~grape_rewards.rewards.composite.ensemble_rank_part`), applied to the recall@K shape: the ensemble's
R@K is the mean over queries of the mean (``mean`` rule) or the minimum (``min``) of the retrievers' hits
(rank <= K). Under ``mean`` that is the mean of the retrievers' R@K; under ``min`` the share of queries whose
target is in the top K of every retriever (:data:`ENSEMBLE_RECALL`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..corpus.build import build_index
from ..corpus.index import CorpusIndex, CorpusIndexError, read_manifest
from ..corpus.rank import DEFAULT_CHUNK_ELEMENTS, RankStats, pair_scores
from ..corpus.source import CorpusSource
from ..datasets.schema import Benchmark, Query
from ..retrievers.base import Retriever
from ..rewards.composite import ensemble_rank_part
from .inflation_report import SimilarityDistribution, from_rank_stats
from .metrics import CIRR_RECALL_KS, CIRR_SUBMISSION_TOP_K, CIRR_SUBSET_KS, recall_at_k, subset_ranks, top_k_ids

logger = logging.getLogger(__name__)

RECALL_KS: tuple[int, ...] = (1, 5, 10)
"""The K of text-to-image Recall@K."""
ORIGINAL = "original"
"""The name of the original queries' method."""
ENSEMBLE_RECALL: dict[str, str] = {
    "mean": "ensemble R@K = the mean over the retrievers of their R@K (per query: the mean of the retrievers' "
            "hits, rank <= K)",
    "min": "ensemble R@K = the share of queries whose target is in the top K of every retriever (per query: the "
           "minimum of the retrievers' hits, rank <= K)",
}
"""What an ensemble's combined Recall@K is under each rule (the ensemble reward's rank part under the recall@K
shape, averaged over the queries); R_subset@K alike, and the headline (mean / avg) is computed from these."""


# -- rewrite files ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewriteSet:
    """The rewrites of one method by query id (from a ``grape-rewards rewrite`` JSONL file)."""

    name: str
    rewrites: dict[str, str]
    source: str | None = None
    models: tuple[str, ...] = ()
    """The distinct ``model`` values of the file."""

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> RewriteSet:
        """Read a rewrites JSONL (``query_id``, ``rewrite``; ``raw`` and ``model`` optional)."""
        from ..rewrite.store import read_rewrites

        rows = read_rewrites(path)
        models = tuple(sorted({str(r["model"]) for r in rows.values() if r.get("model") is not None}))
        return cls(name or Path(path).stem, {k: r["rewrite"] for k, r in rows.items()}, str(path), models)


def parse_named_path(text: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` -> (None, PATH).

    >>> parse_named_path("grpo-rank=out/rw.jsonl")
    ('grpo-rank', PosixPath('out/rw.jsonl'))
    >>> parse_named_path("out/rw.jsonl")
    (None, PosixPath('out/rw.jsonl'))
    """
    name, sep, path = text.partition("=")
    if sep and path and re.fullmatch(r"[\w.@+-]+", name) and not Path(text).exists():
        return name, Path(path)
    return None, Path(text)


def safe_name(name: str) -> str:
    """A method name usable in file names.

    >>> safe_name("qwen 7b/rank")
    'qwen_7b_rank'
    """
    return re.sub(r"[^\w.@+-]+", "_", name).strip("_") or "method"


# -- index --------------------------------------------------------------------------------------------------
def corpus_source(benchmark: Benchmark, modality: str) -> CorpusSource:
    """The benchmark's corpus as an index source of ``modality`` (``image`` paths or ``text``)."""
    records = []
    for item in benchmark.corpus():
        payload = item.image if modality == "image" else item.text
        if payload is None:
            raise ValueError(f"{benchmark!r}: corpus item {item.id!r} has no {modality}, but the retriever embeds "
                             f"{modality} corpora")
        records.append((item.id, payload))
    return CorpusSource.from_records(records, modality, origin=f"{benchmark.name}:{benchmark.split}:{benchmark.root}")


def prepare_index(
    benchmark: Benchmark,
    retriever: Retriever,
    *,
    index_dir: str | Path | None = None,
    save_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 4,
    progress: bool = True,
) -> CorpusIndex:
    """The benchmark's corpus index on the retriever's device.

    ``index_dir``: load this prebuilt index (``grape-rewards index build``); its retriever fingerprint
    must match. ``save_dir``: build the benchmark's corpus there, or reuse the index already there when it
    was built from the same corpus with the same retriever. Neither: build in a temporary folder.
    """
    if index_dir is not None and save_dir is not None:
        raise ValueError("give either an index to load or a folder to save one in, not both")
    load_kw = {"device": retriever.device, "expected_fingerprint": retriever.fingerprint,
               "expected_spec": retriever.spec}
    if index_dir is not None:
        return CorpusIndex.load(index_dir, **load_kw)
    source = corpus_source(benchmark, retriever.corpus_modality)
    build_kw = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    if save_dir is not None:
        save = Path(save_dir)
        if (save / "manifest.json").is_file():
            manifest = read_manifest(save)
            if manifest.get("source", {}).get("sha256") != source.digest:
                other = manifest.get("source", {}).get("origin")
                raise CorpusIndexError(f"{save} holds an index of another corpus ({other}), not {source.origin}; "
                                       "choose another --save-index folder or delete it")
            logger.info("reusing the index in %s", save)
            return CorpusIndex.load(save, **load_kw)
        build_index(source, retriever, save, **build_kw)
        return CorpusIndex.load(save, **load_kw)
    with tempfile.TemporaryDirectory(prefix="grape-eval-index-") as tmp:
        build_index(source, retriever, Path(tmp) / "index", **build_kw)
        return CorpusIndex.load(Path(tmp) / "index", **load_kw)


# -- encoding -----------------------------------------------------------------------------------------------
def encode_queries(
    retriever: Retriever,
    index: CorpusIndex,
    texts: Sequence[str],
    reference_ids: Sequence[str | None] | None = None,
    *,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "encode",
) -> torch.Tensor:
    """Query vectors (float32, CPU): text embeddings, fused with the reference image's embedding from the
    index when the retriever takes a reference (composed retrieval)."""
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        chunks.append(retriever.encode_texts(list(texts[start:start + batch_size]), batch_size=batch_size)
                      .to("cpu", torch.float32))
    emb = torch.cat(chunks) if chunks else torch.empty(0, retriever.dim)
    if retriever.takes_reference:
        if reference_ids is None or any(r is None for r in reference_ids):
            raise ValueError(f"{retriever.spec!r} fuses a reference image into every query, but some queries have "
                             "no reference_id")
        rows = index.rows([r for r in reference_ids if r is not None])
        ref = index.embeddings[rows].to("cpu", torch.float32)
        emb = retriever.fuse_queries(emb, ref).to("cpu", torch.float32)
    return emb


# -- results ------------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """One method's queries and what they scored."""

    name: str
    texts: list[str]
    source: str | None = None
    models: tuple[str, ...] = ()
    fallback_missing: int = 0
    """Queries the rewrite file lacks (the original query was used)."""
    fallback_empty: int = 0
    """Queries whose rewrite is empty (the original query was used)."""
    fallback_ids: list[str] = field(default_factory=list)
    metrics: dict[str, float] | None = None
    stats: RankStats | None = None
    subset_ranks: list[int] | None = None
    recall_ranked_ids: list[list[str]] | None = None
    """CIRR submissions: the top gallery ids of each query (reference removed)."""
    subset_ranked_ids: list[list[str]] | None = None

    @property
    def fallbacks(self) -> int:
        return self.fallback_missing + self.fallback_empty

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metrics": self.metrics, "fallback": {"missing": self.fallback_missing,
                                                                     "empty": self.fallback_empty,
                                                                     "total": self.fallbacks}}
        if self.source is not None:
            out["source"] = self.source
        if self.models:
            out["models"] = list(self.models)
        return out


@dataclass
class EvalReport:
    """Everything an evaluation computed; :meth:`to_dict` is ``metrics.json``, :meth:`to_markdown` the table."""

    benchmark: dict[str, Any]
    retriever: dict[str, Any]
    index: dict[str, Any]
    protocol: str
    """``recall`` (text-to-image Recall@1/5/10) or ``cirr``."""
    queries: list[Query]
    """The evaluated queries, in order (the rows of every method's arrays)."""
    methods: list[MethodResult]
    labelled: bool = True
    members: list[EvalReport] = field(default_factory=list)
    """An ensemble's: each retriever's own evaluation, in order (empty for one retriever). The ensemble's
    ``methods`` then hold the combined metrics (:data:`ENSEMBLE_RECALL`), the first retriever's statistics (as the
    ensemble reward logs the first retriever's rank and similarities), and ``retriever``/``index`` are the first's."""
    ensemble_rule: str | None = None
    """An ensemble's rule: ``mean`` or ``min``."""

    @property
    def headline(self) -> str:
        return "avg" if self.protocol == "cirr" else "mean"

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no method {name!r}; methods: {[m.name for m in self.methods]}")

    def to_dict(self) -> dict[str, Any]:
        """``metrics.json`` (less ``files`` and ``inflation``, which :func:`write_eval_outputs` adds). An ensemble
        adds ``ensemble``: ``rule``, ``combined`` (the definition of its metrics, :data:`ENSEMBLE_RECALL`) and
        ``members``, per retriever in order its ``retriever``, ``index`` and ``methods`` (name to ``metrics``)."""
        out = {"benchmark": self.benchmark, "retriever": self.retriever, "index": self.index,
               "protocol": self.protocol, "labelled": self.labelled, "headline": self.headline,
               "methods": {m.name: m.summary() for m in self.methods}}
        if self.members:
            out["ensemble"] = {
                "rule": self.ensemble_rule, "combined": ENSEMBLE_RECALL[str(self.ensemble_rule)],
                "members": [{"retriever": r.retriever, "index": r.index,
                             "methods": {m.name: {"metrics": m.metrics} for m in r.methods}} for r in self.members]}
        return out

    @staticmethod
    def _retriever_line(retriever: dict[str, Any]) -> str:
        line = f"`{retriever.get('spec')}`"
        if "fusion" in retriever:
            line += f", fusion {retriever['fusion']} (image weight {retriever.get('image_weight')})"
        return line

    def to_markdown(self) -> str:
        """A markdown table: one row per method, the metrics in percent, the change of the headline metric
        against the original queries, and how many queries fell back to the original. An ensemble's: the combined
        table first, then one per retriever."""
        b = self.benchmark
        title = f"# {b['name']} ({b['split']}): {b['num_evaluated']} queries, corpus of {self.index['count']}\n\n"
        if self.members:
            title += (f"Ensemble of {len(self.members)} retrievers, rule {self.ensemble_rule}: "
                      + "; ".join(f"{j}: {self._retriever_line(r.retriever)} (index {r.index.get('path')})"
                                  for j, r in enumerate(self.members)) + ".\n\n")
            tables = [f"## Ensemble ({self.ensemble_rule})\n\n" + self._table()]
            tables += [f"## Retriever {j}: {self._retriever_line(r.retriever)}\n\n" + r._table()
                       for j, r in enumerate(self.members)]
            definition = ENSEMBLE_RECALL[str(self.ensemble_rule)]
            subset = "; R_subset@K alike" if self.protocol == "cirr" else ""
            notes = [f"{definition[0].upper()}{definition[1:]}{subset}; the headline metric is computed from these. "
                     "Each retriever's table ranks over its own index."]
            return title + "\n\n".join(tables) + "\n\n" + self._notes(notes)
        title += f"Retriever {self._retriever_line(self.retriever)}.\n\n"
        if not self.labelled:
            lines = [title + "Labels are hidden on this split: no metrics; submission files only.\n"]
            for m in self.methods:
                lines.append(f"- {m.name}: {m.fallbacks} fallbacks to the original query\n")
            return "".join(lines)
        return title + self._table() + "\n\n" + self._notes()

    def _table(self) -> str:
        """The metrics table of :meth:`to_markdown` (labelled splits)."""
        keys = [k for k in (self.methods[0].metrics or {})]
        header = ["method", *keys, f"Δ{self.headline}", "fallback"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        base = self.method(ORIGINAL).metrics if any(m.name == ORIGINAL for m in self.methods) else None
        for m in self.methods:
            metrics = m.metrics or {}
            cells = [m.name] + [f"{metrics[k]:.2f}" for k in keys]
            delta = metrics[self.headline] - base[self.headline] if base is not None else float("nan")
            cells.append("—" if m.name == ORIGINAL else f"{delta:+.2f}")
            cells.append(f"{m.fallbacks} ({m.fallback_missing} missing, {m.fallback_empty} empty)" if m.fallbacks
                         else "0")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _notes(self, extra: Sequence[str] = ()) -> str:
        notes = []
        if self.protocol == "cirr":
            notes.append("R@K over the whole gallery minus the reference image; R_subset@K over the query's image "
                         "set minus the reference; avg = (R@5 + R_subset@1) / 2.")
        else:
            notes.append("mean = mean of R@1, R@5 and R@10.")
        notes.append("Δ: change of the headline metric against the original queries. fallback: queries a rewrite "
                     "file lacks or leaves empty, evaluated with the original query.")
        return "\n".join([*notes, *extra]) + "\n"

    def similarity_distributions(self) -> list[SimilarityDistribution]:
        """Per method: similarity to the target, to the best and to the mean non-target (for the inflation report).
        An ensemble's: per retriever and method, named ``<method> [retriever <j>]`` (similarities of different
        retrievers are not on one scale, so none is combined)."""
        if self.members:
            return [from_rank_stats(f"{m.name} [retriever {j}]", m.stats, m.source)
                    for j, r in enumerate(self.members) for m in r.methods if m.stats is not None]
        return [from_rank_stats(m.name, m.stats, m.source) for m in self.methods if m.stats is not None]

    def per_query_rows(self) -> list[dict[str, Any]]:
        """One row per (method, query): rank, similarities, subset rank, whether it fell back. An ensemble's rows
        are the first retriever's, plus ``retriever_<j>_rank`` (and CIRR's ``retriever_<j>_subset_rank``) for each
        retriever ``j``, as the ensemble reward's samples."""
        rows = []
        for i_method, m in enumerate(self.methods):
            fallback = set(m.fallback_ids)
            for i, q in enumerate(self.queries):
                row: dict[str, Any] = {"method": m.name, "query_id": q.query_id, "query": m.texts[i],
                                       "fallback": q.query_id in fallback}
                if m.stats is not None:
                    row.update(rank=int(m.stats.rank[i]), n=int(m.stats.n[i]),
                               target_sim=float(m.stats.target_sim[i]), mean_sim=float(m.stats.mean_sim[i]),
                               best_nontarget_sim=float(m.stats.best_nontarget_sim[i]),
                               margin=float(m.stats.margin[i]))
                if m.subset_ranks is not None:
                    row["subset_rank"] = m.subset_ranks[i]
                for j, r in enumerate(self.members):
                    member = r.methods[i_method]
                    if member.stats is not None:
                        row[f"retriever_{j}_rank"] = int(member.stats.rank[i])
                    if member.subset_ranks is not None:
                        row[f"retriever_{j}_subset_rank"] = member.subset_ranks[i]
                rows.append(row)
        return rows


def method_texts(queries: Sequence[Query], rewrites: RewriteSet | None) -> MethodResult:
    """The query texts of one method: the rewrite, or the original where it is missing or empty."""
    if rewrites is None:
        return MethodResult(ORIGINAL, [q.text for q in queries])
    result = MethodResult(rewrites.name, [], source=rewrites.source, models=rewrites.models)
    for q in queries:
        text = rewrites.rewrites.get(q.query_id)
        if text is None:
            result.fallback_missing += 1
        elif not text.strip():
            result.fallback_empty += 1
        else:
            result.texts.append(text)
            continue
        result.fallback_ids.append(q.query_id)
        result.texts.append(q.text)
    return result


RecallFn = Callable[[bool, Sequence[int]], dict[str, float]]
"""``recall(subset, ks)``: Recall@K in percent for each K, plus ``mean`` (as :func:`recall_at_k`), over the whole
gallery (``subset`` False) or CIRR's image sets (True)."""


def protocol_metrics(protocol: str, recall: RecallFn) -> dict[str, float]:
    """The metrics a protocol reports, from its Recall@K: ``recall``'s R@1/5/10 and mean; CIRR's R@1/5/10/50,
    R_subset@1/2/3 and avg = (R@5 + R_subset@1) / 2.

    >>> protocol_metrics("cirr", lambda subset, ks: {f"R@{k}": (10.0 if subset else 1.0) * k for k in ks})
    {'R@1': 1.0, 'R@5': 5.0, 'R@10': 10.0, 'R@50': 50.0, 'R_subset@1': 10.0, 'R_subset@2': 20.0, \
'R_subset@3': 30.0, 'avg': 7.5}
    """
    if protocol != "cirr":
        return recall(False, RECALL_KS)
    full, sub = recall(False, CIRR_RECALL_KS), recall(True, CIRR_SUBSET_KS)
    metrics = {f"R@{k}": full[f"R@{k}"] for k in CIRR_RECALL_KS}
    metrics.update({f"R_subset@{k}": sub[f"R@{k}"] for k in CIRR_SUBSET_KS})
    metrics["avg"] = (metrics["R@5"] + metrics["R_subset@1"]) / 2
    return metrics


def ensemble_recall_at_k(member_ranks: Sequence[Sequence[int] | np.ndarray], ks: Sequence[int],
                         rule: str) -> dict[str, float]:
    """An ensemble's Recall@K in percent, plus ``mean`` (:data:`ENSEMBLE_RECALL`): per query, the retrievers' hits
    (rank <= K, the recall@K shape) combined by :func:`~grape_rewards.rewards.composite.ensemble_rank_part` (the
    ensemble reward's rule), averaged over the queries. ``member_ranks``: each retriever's 1-based ranks of the
    same queries.

    >>> ranks = [[1, 4, 12], [3, 1, 2]]  # two retrievers' ranks of three queries
    >>> for rule in ("mean", "min"):
    ...     print(rule, {k: round(v, 2) for k, v in ensemble_recall_at_k(ranks, (1, 5), rule).items()})
    mean {'R@1': 33.33, 'R@5': 83.33, 'mean': 58.33}
    min {'R@1': 0.0, 'R@5': 66.67, 'mean': 33.33}
    """
    if len(member_ranks) < 2:
        raise ValueError(f"an ensemble needs two or more retrievers' ranks, got {len(member_ranks)}")
    for ranks in member_ranks:
        recall_at_k(ranks, ks)  # the same checks: 1-D, integers >= 1, valid ks
    arrays = [np.asarray(r) for r in member_ranks]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"the retrievers ranked different numbers of queries: {[len(a) for a in arrays]}")
    out: dict[str, float] = {}
    for k in ks:
        hits = np.stack([a <= k for a in arrays], axis=1).astype(float)  # (queries, retrievers)
        out[f"R@{k}"] = 100.0 * math.fsum(ensemble_rank_part(row.tolist(), rule) for row in hits) / len(hits)
    out["mean"] = float(np.mean([out[f"R@{k}"] for k in ks]))
    return out


def ranks_recall(full: Sequence[Sequence[int] | np.ndarray], subset: Sequence[Sequence[int] | np.ndarray],
                 rule: str = "mean") -> RecallFn:
    """The :data:`RecallFn` of one retriever's ranks (``full``: its whole-gallery ranks, ``subset``: CIRR's image-set
    ranks, each a one-item list) or, for several, of their ensemble under ``rule``."""
    def recall(in_subset: bool, ks: Sequence[int]) -> dict[str, float]:
        ranks = subset if in_subset else full
        return recall_at_k(ranks[0], ks) if len(ranks) == 1 else ensemble_recall_at_k(ranks, ks, rule)

    return recall


def _subset_scores(queries: torch.Tensor, index: CorpusIndex, subsets: Sequence[Sequence[str]]) -> list[list[float]]:
    """Each query's exact (float64) similarity to each id of its subset, in subset order (ties stay ties)."""
    out = []
    for q, subset in zip(queries, subsets):
        emb = index.embeddings[index.rows(subset)].to("cpu", torch.float32)
        out.append(pair_scores(q.to("cpu", torch.float32)[None, :], emb).tolist())
    return out


def evaluate(
    benchmark: Benchmark,
    retriever: Retriever,
    index: CorpusIndex,
    rewrite_sets: Sequence[RewriteSet] = (),
    *,
    batch_size: int = 256,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    limit: int | None = None,
    submissions: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Evaluate the original queries and each rewrite set on ``benchmark`` over ``index``.

    Args:
        index: the benchmark's corpus embedded by ``retriever`` (see :func:`prepare_index`).
        rewrite_sets: the rewrites of each method; names must be unique and not ``original``.
        limit: evaluate only the first ``limit`` queries (a quick look; not comparable with full runs).
        submissions: CIRR: also rank the top 50 / top 3 ids for the server's submission files
            (always done on the unlabelled test split).
    """
    names = [ORIGINAL] + [r.name for r in rewrite_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique (and not {ORIGINAL!r}); got {names}")
    if index.fingerprint is not None and index.fingerprint != retriever.fingerprint:
        raise CorpusIndexError(f"index {index.name} was built by another retriever (fingerprint {index.fingerprint}) "
                               f"than {retriever.spec!r} ({retriever.fingerprint})")
    protocol = "cirr" if benchmark.name == "cirr" else "recall"
    all_queries = list(benchmark.queries())
    if not all_queries:
        raise ValueError(f"{benchmark!r} has no queries")
    all_ids = {q.query_id for q in all_queries}
    for rs in rewrite_sets:
        known = sum(1 for qid in rs.rewrites if qid in all_ids)
        if rs.rewrites and known == 0:
            raise ValueError(f"rewrite file {rs.source or rs.name} shares no query_id with {benchmark!r} "
                             f"(e.g. {next(iter(rs.rewrites))!r}); was it made for another benchmark or split?")
        if known < len(rs.rewrites):
            logger.warning("%s: %d rewrites are for queries that %r does not have", rs.source or rs.name,
                           len(rs.rewrites) - known, benchmark)
    labelled = any(q.target_ids for q in all_queries)
    if not labelled and protocol != "cirr":
        raise ValueError(f"{benchmark!r} has no labelled queries: nothing to evaluate")
    queries = [q for q in all_queries if q.target_ids] if labelled else all_queries
    skipped = len(all_queries) - len(queries)
    if skipped:
        logger.warning("%r: %d queries without a target are skipped", benchmark, skipped)
    if limit is not None:
        queries = queries[:limit]
    if protocol == "cirr":
        for q in queries:
            if q.subset_ids is None:
                raise ValueError(f"CIRR query {q.query_id} has no image set (subset_ids)")
            if labelled and q.target_ids[0] not in q.subset_ids:
                raise ValueError(f"CIRR query {q.query_id}: target {q.target_ids[0]!r} is not in its image set "
                                 f"{list(q.subset_ids)}; Recall_subset is undefined")
    # Every id the evaluation touches must be in the index (a clear error instead of a wrong number).
    for q in queries:
        index.rows([*q.target_ids, *q.excluded_ids, *(q.subset_ids or ())])
    if benchmark.task == "composed" and not retriever.takes_reference:
        logger.warning("%s does not fuse the reference image: composed queries are retrieved by their text alone",
                       retriever.spec)

    references = [q.reference_id for q in queries]
    targets = [list(q.target_ids) for q in queries]
    excluded = [list(q.excluded_ids) for q in queries]
    methods = [method_texts(queries, None)] + [method_texts(queries, rs) for rs in rewrite_sets]
    for m in methods:
        emb = encode_queries(retriever, index, m.texts, references, batch_size=batch_size, progress=progress,
                             desc=f"encode {m.name}")
        subsets = [list(q.subset_ids or ()) for q in queries] if protocol == "cirr" else []
        subset_scores = _subset_scores(emb, index, subsets) if subsets else []
        if labelled:
            m.stats = index.rank(emb, targets, excluded, chunk_elements=chunk_elements)
            ranks = m.stats.rank.numpy()
            if protocol == "cirr":
                scores = [dict(zip(s, sc)) for s, sc in zip(subsets, subset_scores)]
                m.subset_ranks = subset_ranks(scores, [t[0] for t in targets], references)
            m.metrics = protocol_metrics(protocol, ranks_recall([ranks], [m.subset_ranks or []]))
        if protocol == "cirr" and (submissions or not labelled):
            k = CIRR_SUBMISSION_TOP_K["recall"] + 1  # one more: the reference may be among the top
            _, top = index.search(emb, k, backend="torch")
            m.recall_ranked_ids = top
            m.subset_ranked_ids = [top_k_ids(s, sc, len(s)) for s, sc in zip(subsets, subset_scores)]

    benchmark_info = {"name": benchmark.name, "split": benchmark.split, "root": str(benchmark.root),
                      "task": benchmark.task, "num_queries": len(all_queries), "num_evaluated": len(queries),
                      "skipped_no_target": skipped, "limit": limit}
    index_info = {"path": str(index.path) if index.path else None, "count": len(index), "dim": index.dim,
                  "fingerprint": index.fingerprint}
    return EvalReport(benchmark_info, retriever.describe(), index_info, protocol, queries, methods, labelled)


def check_ensemble_benchmark(benchmark: Benchmark, submissions: bool = False) -> None:
    """Refuse what an ensemble cannot evaluate, before any model or index is loaded: CIRR submission files (asked
    for, or the only output of an unlabelled split) list one ranking of the gallery, and an ensemble has none."""
    if benchmark.name != "cirr":
        return
    if submissions or not any(q.target_ids for q in benchmark.queries()):
        raise ValueError("CIRR submission files rank the gallery by one retriever, and an ensemble of indexes has no "
                         "single ranking: evaluate one --index at a time for submissions (without "
                         "--write-submissions, an ensemble reports the metrics of a labelled split)")


def evaluate_ensemble(
    benchmark: Benchmark,
    members: Sequence[tuple[Retriever, CorpusIndex]],
    rewrite_sets: Sequence[RewriteSet] = (),
    *,
    rule: str = "mean",
    batch_size: int = 256,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    limit: int | None = None,
    submissions: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Evaluate an ensemble: :func:`evaluate` with each retriever over its own index (the indexes must hold the same
    ids, in any order: :func:`~grape_rewards.ensemble.check_same_ids`), then the combined metrics of each method
    under ``rule`` (``mean`` or ``min``, :data:`ENSEMBLE_RECALL`).

    The report's ``methods`` hold the combined metrics with the first retriever's statistics (the per-query rows'
    ``rank`` and similarities, as the ensemble reward logs them) and ``members`` each retriever's own report.
    CIRR submissions are refused (:func:`check_ensemble_benchmark`).
    """
    from ..ensemble import check_same_ids

    if len(members) < 2:
        raise ValueError(f"an ensemble needs two or more retrievers, one index each; got {len(members)}")
    if rule not in ENSEMBLE_RECALL:
        raise ValueError(f"unknown ensemble rule {rule!r}; choose {' or '.join(map(repr, ENSEMBLE_RECALL))}")
    check_same_ids([index for _, index in members])
    check_ensemble_benchmark(benchmark, submissions)
    reports = [evaluate(benchmark, retriever, index, rewrite_sets, batch_size=batch_size,
                        chunk_elements=chunk_elements, limit=limit, progress=progress)
               for retriever, index in members]
    first = reports[0]
    methods = []
    for i, m in enumerate(first.methods):
        per = [r.methods[i] for r in reports]
        combined = MethodResult(m.name, m.texts, source=m.source, models=m.models, fallback_missing=m.fallback_missing,
                                fallback_empty=m.fallback_empty, fallback_ids=list(m.fallback_ids), stats=m.stats,
                                subset_ranks=m.subset_ranks)
        if first.labelled:
            full = [p.stats.rank.numpy() for p in per if p.stats is not None]
            combined.metrics = protocol_metrics(first.protocol,
                                                ranks_recall(full, [p.subset_ranks or [] for p in per], rule))
        methods.append(combined)
    return EvalReport(first.benchmark, first.retriever, first.index, first.protocol, first.queries, methods,
                      first.labelled, members=reports, ensemble_rule=rule)


def write_eval_outputs(report: EvalReport, out_dir: str | Path, *, per_query: bool = False,
                       extra_distributions: Sequence[SimilarityDistribution] = (), plot: bool = True) -> dict[str, Any]:
    """Write an evaluation's files into ``out_dir`` and return their paths.

    ``metrics.json`` and ``metrics.md`` (the table); ``inflation.json``, ``inflation.md`` and
    ``inflation.png`` (labelled splits, plus ``extra_distributions``, e.g. scored JSONL files);
    ``per_query.jsonl`` with ``per_query``; CIRR submissions ``submissions/<method>.<split>_recall.json``
    and ``..._recall_subset.json`` where they were ranked.

    A submission the CIRR server would not take (e.g. a gallery of fewer than 51 images cannot give each query
    its top 50 besides the reference) is refused on its own: the metrics and the other files are still written,
    and the reason is logged and returned under ``files["submissions_refused"]`` (method name to reason), and
    in ``metrics.json`` as the method's ``submissions_refused``.

    An ensemble's report (:func:`evaluate_ensemble`) writes the same files: ``metrics.json`` adds ``ensemble``
    (:meth:`EvalReport.to_dict`), ``metrics.md`` a table per retriever after the combined one, the inflation report
    one distribution per retriever and method (``<method> [retriever <j>]``), and ``per_query.jsonl`` the first
    retriever's rows with each retriever's ``retriever_<j>_rank`` (CIRR: ``retriever_<j>_subset_rank``).
    """
    from ..corpus.files import atomic_write_bytes, atomic_write_json
    from .inflation_report import write_inflation_report
    from .metrics import write_cirr_submissions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"metrics_json": str(out / "metrics.json"), "metrics_md": str(out / "metrics.md")}
    result = report.to_dict()
    submissions: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    for m in report.methods:
        if m.recall_ranked_ids is None or m.subset_ranked_ids is None:
            continue
        pairids = [int(q.query_id) if q.query_id.isdigit() else q.query_id for q in report.queries]
        prefix = out / "submissions" / f"{safe_name(m.name)}.{report.benchmark['split']}"
        try:
            paths = write_cirr_submissions(prefix, pairids, m.recall_ranked_ids, m.subset_ranked_ids,
                                           reference_ids=[q.reference_id for q in report.queries])
        except ValueError as exc:  # both files are built before either is written: none is left half-done
            refused[m.name] = (f"CIRR submission of {m.name!r} not written: {exc}; the index holds "
                               f"{report.index['count']} items, and the server takes each query's top "
                               f"{CIRR_SUBMISSION_TOP_K['recall']} of the gallery besides its reference and top "
                               f"{CIRR_SUBMISSION_TOP_K['recall_subset']} of its image set")
            logger.warning("%s", refused[m.name])
            result["methods"][m.name]["submissions_refused"] = refused[m.name]
            continue
        submissions[m.name] = [str(p) for p in paths]
        result["methods"][m.name]["submissions"] = submissions[m.name]
    if submissions:
        files["submissions"] = submissions
    if refused:
        files["submissions_refused"] = refused
    dists = [*report.similarity_distributions(), *extra_distributions]
    if dists:
        title = f"{report.benchmark['name']} {report.benchmark['split']}"
        inflation = write_inflation_report(dists, out, title=title, plot=plot)
        files["inflation"] = inflation["files"]
        result["inflation"] = inflation["summaries"]
    if per_query:
        rows = report.per_query_rows()
        atomic_write_bytes(out / "per_query.jsonl",
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        files["per_query"] = str(out / "per_query.jsonl")
    result["files"] = files
    atomic_write_json(files["metrics_json"], result)
    atomic_write_bytes(files["metrics_md"], report.to_markdown().encode("utf-8"))
    return files
