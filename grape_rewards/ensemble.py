"""An ensemble of frozen retrievers: a rewrite that fools one retriever no longer earns the full reward.

Each retriever has its own index of the same corpus ids. Every item is ranked by each of them (one encode and
one scan per retriever, with each scorer's own cache), and the rank part of the reward is the mean or the minimum
(``RewardConfig.ensemble``) of their rank parts (:func:`~grape_rewards.rewards.composite.ensemble_rank_part`). The
other statistics (``rank``, similarities, ``num_tokens``, ``truncated``) are the first retriever's; every sample
also carries ``retriever_<j>_rank`` and ``retriever_<j>_part_rank`` for each retriever ``j`` (in the order given).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .alarms import ALARM_KEYS
from .corpus.index import CorpusIndex, CorpusIndexError
from .retrievers.base import Retriever
from .rewards.composite import ensemble_rank_part, sample_keys, score_sample
from .rewards.config import AlarmConfig, RewardConfig
from .rewards.format import Extraction
from .scorer import ItemRows, RewardItem, RewardScorer, ScoredBatch, load_retriever_and_index


def retriever_keys(count: int) -> tuple[str, ...]:
    """The per-retriever keys of an ensemble's samples.

    >>> retriever_keys(2)
    ('retriever_0_rank', 'retriever_0_part_rank', 'retriever_1_rank', 'retriever_1_part_rank')
    """
    return tuple(key for j in range(count) for key in (f"retriever_{j}_rank", f"retriever_{j}_part_rank"))


def check_ensemble_request(index_dirs: Sequence[object], retriever: object | None = None) -> None:
    """The rule of an ensemble's request, the one copy every entry point relies on (``score``, ``serve``, the
    in-process adapters, ``eval``): at least one index; with several, each index's manifest names its own retriever,
    so a shared ``retriever`` is refused (:class:`ValueError`, which the CLI reports as a usage error).

    >>> check_ensemble_request(["a", "b"], "text:all-MiniLM-L6-v2")
    Traceback (most recent call last):
    ...
    ValueError: retriever: an ensemble of indexes uses each index's own retriever; drop --retriever
    """
    if not index_dirs:
        raise ValueError("no index given; pass an index folder (--index)")
    if len(index_dirs) > 1 and retriever is not None:
        raise ValueError("retriever: an ensemble of indexes uses each index's own retriever; drop --retriever")


def check_same_ids(indexes: Sequence[CorpusIndex]) -> None:
    """Refuse indexes that do not all hold the first one's ids (in any order: each member resolves its own rows).

    The :class:`CorpusIndexError` names the index that differs, an id that only one of the two holds and which one,
    and how many ids differ.
    """
    first = indexes[0]
    ids = set(first.ids)
    for index in indexes[1:]:
        other = set(index.ids)
        missing, extra = sorted(ids - other), sorted(other - ids)
        if missing or extra:
            example, holder = (missing[0], first.name) if missing else (extra[0], index.name)
            raise CorpusIndexError(
                f"index {index.name} does not hold the same ids as {first.name}: {example!r} is in {holder} only "
                f"({len(missing)} ids missing, {len(extra)} extra); an ensemble ranks one corpus")


class EnsembleScorer(RewardScorer):
    """A :class:`RewardScorer` over several retrievers, each with its index of the same corpus ids.

    It is the first retriever's scorer (its cache, ``/retrieve`` and validation serve the whole ensemble) holding
    one more scorer per other retriever; the alarms watch the combined samples.
    """

    def __init__(self, retrievers: Sequence[Retriever], indexes: Sequence[CorpusIndex],
                 config: RewardConfig | None = None, **scorer_options: Any) -> None:
        """``scorer_options``: :class:`RewardScorer`'s (``cache_size``, ``max_text_chars``...), for every member."""
        if len(retrievers) != len(indexes) or len(retrievers) < 2:
            raise ValueError(f"an ensemble needs two or more retrievers, one index each; got {len(retrievers)} "
                             f"retrievers and {len(indexes)} indexes")
        config = config or RewardConfig()
        super().__init__(retrievers[0], indexes[0], config, **scorer_options)
        check_same_ids(indexes)
        quiet = config.model_copy(update={"alarms": AlarmConfig(enabled=False)})
        self.members = [RewardScorer(r, i, quiet, **scorer_options) for r, i in zip(retrievers[1:], indexes[1:])]
        """The scorers of the other retrievers (the alarms watch only the ensemble's samples)."""
        self._same_rows = [list(index.ids) == list(indexes[0].ids) for index in indexes[1:]]
        """Per member: whether its index holds the ids in the first one's order (then the validated rows serve it)."""
        self.keys = (*sample_keys(config), *retriever_keys(len(retrievers)),
                     *(ALARM_KEYS if self.alarms is not None else ()))

    def describe(self) -> dict[str, object]:
        """The rule and each retriever with its index, in order (for /info)."""
        scorers: list[RewardScorer] = [self, *self.members]
        return {"rule": self.config.ensemble,
                "members": [{"retriever": s.retriever.spec, "fingerprint": s.retriever.fingerprint,
                             "index": s.index.name} for s in scorers]}

    def _rank_and_compose(self, items: Sequence[RewardItem], rows: ItemRows) -> tuple[ScoredBatch, list[Extraction]]:
        first, extractions = super()._rank_and_compose(items, rows)
        batches = [first] + [m._rank_and_compose(items, rows if same else m.resolve_rows(items))[0]
                             for m, same in zip(self.members, self._same_rows)]
        t0 = time.perf_counter()
        config = self.config
        samples = []
        for i, (ex, s) in enumerate(zip(extractions, first.samples)):
            per = [b.samples[i] for b in batches]
            part = ensemble_rank_part([p["part_rank"] for p in per], config.ensemble)
            sample = score_sample(config, ex, rank=int(s["rank"]), n=int(s["n"]), target_sim=s["target_sim"],
                                  mean_sim=s["mean_sim"], best_nontarget_sim=s["best_nontarget_sim"],
                                  num_tokens=int(s["num_tokens"]), truncated=s["truncated"] == 1.0,
                                  original_rank=s.get("original_rank"), part_rank=part,
                                  graded=s.get("graded_rank"))
            for j, p in enumerate(per):
                sample[f"retriever_{j}_rank"] = p["rank"]
                sample[f"retriever_{j}_part_rank"] = p["part_rank"]
            samples.append(sample)
        timings = dict(first.timings)
        for b in batches[1:]:
            for key in ("encode_s", "rank_s", "original_s", "total_s"):
                timings[key] += b.timings[key]
        timings["total_s"] += time.perf_counter() - t0
        return ScoredBatch(samples, timings), extractions


def scorer_from_indexes(index_dirs: Sequence[str | Path], config: RewardConfig | None = None, *,
                        retriever: str | Retriever | None = None, scorer_options: dict[str, Any] | None = None,
                        **retriever_overrides: Any) -> RewardScorer:
    """The scorer of one index folder (:meth:`RewardScorer.from_index`) or, for several, the
    :class:`EnsembleScorer` of each one's own retriever (``retriever`` is then refused: each index names its own;
    :func:`check_ensemble_request`, before anything is loaded).
    """
    check_ensemble_request(index_dirs, retriever)
    if len(index_dirs) == 1:
        return RewardScorer.from_index(index_dirs[0], config, retriever=retriever, scorer_options=scorer_options,
                                       **retriever_overrides)
    loaded = [load_retriever_and_index(path, None, **retriever_overrides) for path in index_dirs]
    return EnsembleScorer([r for r, _ in loaded], [i for _, i in loaded], config, **(scorer_options or {}))
