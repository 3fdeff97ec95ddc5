"""Judges for the reward benchmark: retrievers (and ground truth) that rank a candidate's target without being the
reward's own retriever.

A judge says, for each candidate rewrite, how many corpus items rank strictly above its query's best target
(``above``) and how many others tie with it (``tied``). The target's position is then uniform over the ties, and
Recall@K and MRR are exact expectations (:func:`grape_rewards.eval.metrics.expected_recall_at_k`).

- :class:`BM25Judge`: BM25 (``bm25s``) over the corpus texts; lexical scores tie often, hence the expectation.
- :class:`IndexJudge`: any index over the same ids, with its own retriever (another dense embedder, another CLIP);
  ranks come from the package's exact rank engine (ties count for the target, so ``tied`` is 0).
- :class:`LabelJudge`: ground truth that no retriever provides, from a JSONL of ``{"query_id", "rewrite",
  "correct"}`` rows: a correct rewrite counts as rank 1, a wrong one as not in any top K. It reports Recall@1 only.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reward_bench_data import BenchCandidate, BenchInputError, BenchQuery

RETRIEVAL_METRICS: tuple[str, ...] = ("R@1", "R@5", "R@10", "MRR")
NOT_FOUND = 1 << 40
"""``above`` of a candidate a ground-truth judge rejects: outside every top K."""


@dataclass(frozen=True)
class Judgement:
    """Per candidate: corpus items strictly above its target, and other items tied with it (int64 arrays)."""

    above: np.ndarray
    tied: np.ndarray


class Judge(ABC):
    """A retriever (or ground truth) the rewards never see."""

    kind: str = "judge"
    metrics: tuple[str, ...] = RETRIEVAL_METRICS

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen_in_training = False
        """True when the judge's retriever is the reward's own (reported, but not an unseen judge)."""

    @abstractmethod
    def judge(self, candidates: Sequence[BenchCandidate], queries: Mapping[str, BenchQuery]) -> Judgement:
        """How the judge ranks each candidate's target."""

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "seen_in_training": self.seen_in_training, "metrics": list(self.metrics)}


def check_same_ids(judge_ids: Sequence[str], corpus_ids: Sequence[str], what: str) -> None:
    """Refuse a judge whose corpus is not the training corpus (same ids, any order), naming the difference."""
    mine, theirs = set(judge_ids), set(corpus_ids)
    if mine != theirs:
        missing, extra = sorted(theirs - mine), sorted(mine - theirs)
        raise BenchInputError(f"{what} does not cover the training corpus: {len(missing)} id(s) missing (first: "
                              f"{missing[:3]}) and {len(extra)} extra (first: {extra[:3]}); a judge must rank the "
                              "same items")


class BM25Judge(Judge):
    """BM25 over the corpus texts (``bm25s``, English stopwords removed)."""

    kind = "bm25"

    def __init__(self, name: str, texts: Mapping[str, str], corpus_ids: Sequence[str] | None = None) -> None:
        super().__init__(name)
        try:
            import bm25s
        except ImportError:
            raise BenchInputError("the BM25 judge needs bm25s: pip install 'grape-rewards[eval]'") from None
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG on import
        if corpus_ids is not None:
            check_same_ids(list(texts), corpus_ids, f"judge {name!r} (BM25 corpus)")
        self.ids = list(texts)
        self.row = {item_id: i for i, item_id in enumerate(self.ids)}
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize([texts[i] for i in self.ids], stopwords="en", show_progress=False),
                        show_progress=False)

    def judge(self, candidates: Sequence[BenchCandidate], queries: Mapping[str, BenchQuery]) -> Judgement:
        import bm25s

        above = np.zeros(len(candidates), dtype=np.int64)
        tied = np.zeros(len(candidates), dtype=np.int64)
        tokens = bm25s.tokenize([c.rewrite for c in candidates], stopwords="en", show_progress=False,
                                return_ids=False)
        for i, (c, words) in enumerate(zip(candidates, tokens)):
            q = queries[c.query_id]
            scores = (self.bm25.get_scores(words) if words else np.zeros(len(self.ids), dtype=np.float32))
            keep = np.ones(len(self.ids), dtype=bool)
            keep[[self.row[t] for t in q.target_ids]] = False
            keep[[self.row[e] for e in (*q.excluded_ids, *([q.reference_id] if q.reference_id else []))]] = False
            best = max(scores[self.row[t]] for t in q.target_ids)
            above[i] = int((scores[keep] > best).sum())
            tied[i] = int((scores[keep] == best).sum())
        return Judgement(above, tied)


class IndexJudge(Judge):
    """Another index over the same ids, ranked by its own retriever through the package's exact rank engine."""

    kind = "index"

    def __init__(self, name: str, index_dir: str | Path, corpus_ids: Sequence[str] | None = None,
                 training_fingerprint: str | None = None, device: str = "auto") -> None:
        from ..scorer import load_retriever_and_index

        super().__init__(name)
        self.retriever, self.index = load_retriever_and_index(index_dir, device=device)
        if corpus_ids is not None:
            check_same_ids(self.index.ids, corpus_ids, f"judge {name!r} ({index_dir})")
        self.seen_in_training = training_fingerprint is not None and self.index.fingerprint == training_fingerprint

    def judge(self, candidates: Sequence[BenchCandidate], queries: Mapping[str, BenchQuery]) -> Judgement:
        import torch

        texts = [c.rewrite if c.rewrite.strip() else " " for c in candidates]
        above = np.zeros(len(candidates), dtype=np.int64)
        step = 512
        for start in range(0, len(candidates), step):
            part = candidates[start:start + step]
            emb = self.retriever.encode_texts(texts[start:start + step]).to(self.index.device, torch.float32)
            if self.retriever.takes_reference:
                emb = self.retriever.fuse_queries(emb, self.index.vectors([queries[c.query_id].reference_id
                                                                           for c in part]))
            stats = self.index.rank(emb, [list(queries[c.query_id].target_ids) for c in part],
                                    [[*queries[c.query_id].excluded_ids,
                                      *([queries[c.query_id].reference_id] if queries[c.query_id].reference_id
                                        else [])] for c in part])
            above[start:start + len(part)] = (stats.rank - 1).numpy()
        return Judgement(above, np.zeros(len(candidates), dtype=np.int64))


class LabelJudge(Judge):
    """Ground-truth labels of (query, rewrite) pairs: correct is rank 1, wrong is outside every top K."""

    kind = "labels"
    metrics = ("R@1",)

    def __init__(self, name: str, labels: Mapping[tuple[str, str], bool], source: str = "") -> None:
        super().__init__(name)
        self.labels = dict(labels)
        self.source = source

    @classmethod
    def from_file(cls, name: str, path: str | Path) -> LabelJudge:
        """Read ``{"query_id", "rewrite", "correct"}`` rows (JSONL)."""
        from .reward_bench_data import jsonl_rows

        labels: dict[tuple[str, str], bool] = {}
        for where, row in jsonl_rows(path, "ground-truth labels"):
            if set(row) - {"query_id", "rewrite", "correct"} or not {"query_id", "rewrite", "correct"} <= set(row):
                raise BenchInputError(f"{where}: a label row has exactly query_id, rewrite and correct")
            if not isinstance(row["correct"], bool) or not isinstance(row["rewrite"], str):
                raise BenchInputError(f"{where}: correct must be true or false, rewrite a string")
            labels[(str(row["query_id"]), label_key(row["rewrite"]))] = row["correct"]
        return cls(name, labels, str(path))

    def judge(self, candidates: Sequence[BenchCandidate], queries: Mapping[str, BenchQuery]) -> Judgement:
        above = np.zeros(len(candidates), dtype=np.int64)
        for i, c in enumerate(candidates):
            key = (c.query_id, label_key(c.rewrite))
            if key not in self.labels:
                raise BenchInputError(f"judge {self.name!r}: no label for query {c.query_id!r}, rewrite "
                                      f"{c.rewrite[:60]!r}; label every candidate ({self.source})")
            above[i] = 0 if self.labels[key] else NOT_FOUND
        return Judgement(above, np.zeros(len(candidates), dtype=np.int64))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "source": self.source}


def label_key(rewrite: str) -> str:
    """How a rewrite is matched to its label: whitespace collapsed.

    >>> label_key("  a  dog ")
    'a dog'
    """
    return " ".join(rewrite.split())
