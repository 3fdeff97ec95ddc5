"""The reward benchmark: which reward prefers the rewrites that really retrieve better?

A GRPO group is a handful of rewrites of one query, and what training learns from is how the reward orders them.
So each reward is judged the way RewardBench judges a reward model, with judges it never sees (BM25, another
retriever over the same ids, ground truth):

- **best-of-N**: the judge's Recall@1/5/10 and MRR of the candidate the reward ranks first in each query's group
  (when several share the best reward, the exact expectation over a uniform pick among them), with paired bootstrap
  intervals against a baseline reward (over queries, and over groups of queries such as seeds when they are given);
- **pairwise agreement**: over the candidate pairs the judge orders, the share the reward orders the same way, the
  share it orders the other way, and the share it ties;
- **top-tie rate**: the share of queries in which several candidates share the best reward (the reward cannot pick);
- **within-group correlation**: Kendall's tau-b between the reward and the judge in each group, and Pearson's r
  with the judge's reciprocal rank (a GRPO advantage is the reward standardised within its group, so Pearson is what
  the advantages carry), averaged over the groups where both vary.

Rewards are named presets (:func:`parse_reward`) or YAML files; every reward scores every candidate through the
package's one scoring path (:class:`~grape_rewards.scorer.RewardScorer`) on the training index.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..rewards.config import RewardConfig
from . import bootstrap
from .judges import Judge, Judgement
from .metrics import expected_recall_at_k, expected_reciprocal_rank
from .reward_bench_data import BenchCandidate, BenchInputError, BenchQuery

DEFAULT_REWARDS: tuple[str, ...] = ("similarity", "log", "linear", "reciprocal", "recall@10", "loglinear",
                                    "margin-log", "margin-loglinear", "soft-log", "soft-loglinear")
"""The rewards compared when none are named: the baseline, the plain rank shapes and the graded ranks."""
BASELINE = "similarity"
_SPEC = re.compile(r"(?P<relative>relative-)?(?:(?P<mode>margin|soft)-)?(?P<shape>linear|reciprocal|log|loglinear|"
                   r"recall@(?P<k>\d+))")


def parse_reward(text: str) -> tuple[str, RewardConfig]:
    """A reward by name: ``similarity``, ``default`` (the package's default), a YAML file (``NAME=FILE`` to name it),
    or ``[relative-][margin-|soft-]SHAPE[:field=value,...]`` with SHAPE one of linear, reciprocal, log, loglinear,
    recall@K.

    >>> name, config = parse_reward("margin-loglinear:temperature=0.03")
    >>> name, config.rank_mode, config.shape, config.temperature
    ('margin-loglinear:temperature=0.03', 'margin', 'loglinear', 0.03)
    >>> parse_reward("recall@5")[1].k, parse_reward("relative-log")[1].relative
    (5, True)
    """
    name, sep, path = text.partition("=")
    if sep and path.endswith((".yaml", ".yml")) and re.fullmatch(r"[\w.@+-]+", name):
        return name, _no_alarms(RewardConfig.from_yaml(path))
    if text.endswith((".yaml", ".yml")):
        return Path(text).stem, _no_alarms(RewardConfig.from_yaml(text))
    if text == "similarity":
        return text, _no_alarms(RewardConfig.preset("similarity"))
    if text == "default":
        return text, _no_alarms(RewardConfig())
    spec, _, options = text.partition(":")
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"unknown reward {text!r}: give similarity, default, a YAML file, or "
                         "[relative-][margin-|soft-]SHAPE[:field=value,...] with SHAPE linear, reciprocal, log, "
                         "loglinear or recall@K (e.g. margin-loglinear, recall@10, soft-log:temperature=0.02)")
    fields: dict[str, Any] = {"shape": "recall@k" if match["k"] else match["shape"],
                              "rank_mode": match["mode"] or "hard", "relative": bool(match["relative"])}
    if match["k"]:
        fields["k"] = int(match["k"])
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"reward {text!r}: options are field=value, got {item!r}")
        fields[key.strip()] = _option(value.strip())
    return text, _no_alarms(RewardConfig.model_validate(fields))


def reward_name(config: RewardConfig) -> str:
    """The name :func:`parse_reward` reads back for a standard reward (rank part only, or similarity only);
    ``custom`` for any other mix of parts.

    >>> reward_name(RewardConfig(rank_mode="margin", shape="loglinear")), reward_name(RewardConfig.preset("similarity"))
    ('margin-loglinear', 'similarity')
    """
    w = config.weights
    if w == {"rank": 0.0, "similarity": 1.0, "format": 0.0}:
        return "similarity"
    if w != {"rank": 1.0, "similarity": 0.0, "format": 0.0}:
        return "custom"
    shape = f"recall@{config.k}" if config.shape == "recall@k" else config.shape
    mode = "" if config.rank_mode == "hard" else f"{config.rank_mode}-"
    return ("relative-" if config.relative else "") + mode + shape


def _option(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def _no_alarms(config: RewardConfig) -> RewardConfig:
    """The benchmark scores fixed candidates: the reward-hacking alarms watch training streams, not this."""
    return config.model_copy(update={"alarms": config.alarms.model_copy(update={"enabled": False})})


# -- scoring ----------------------------------------------------------------------------------------------------
def score_candidates(index_dir: str | Path, rewards: Mapping[str, RewardConfig], queries: Mapping[str, BenchQuery],
                     candidates: Sequence[BenchCandidate], *, device: str = "auto", batch_size: int = 512,
                     progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every reward of every candidate, on the training index (one retriever load; encodings shared), and what the
    training index is (for the report)."""
    from tqdm.auto import tqdm

    from ..scorer import LRUCache, RewardItem, RewardScorer, load_retriever_and_index

    retriever, index = load_retriever_and_index(index_dir, device=device)
    check_query_ids(queries.values(), index.row_of, str(index_dir))
    cache = LRUCache(1 << 20, None)
    items = [RewardItem(rewrite=c.rewrite, target_ids=list(queries[c.query_id].target_ids),
                        excluded_ids=list(queries[c.query_id].excluded_ids),
                        reference_id=queries[c.query_id].reference_id, query_id=c.query_id,
                        original_query=queries[c.query_id].query) for c in candidates]
    out: dict[str, np.ndarray] = {}
    steps = len(rewards) * math.ceil(len(items) / batch_size)
    with tqdm(total=steps, desc="reward", unit="batch", disable=not progress) as bar:
        for name, config in rewards.items():
            scorer = RewardScorer(retriever, index, config, cache_size=0)
            scorer.embedding_cache = cache  # every reward encodes the same texts: encode them once
            rows = scorer.validate(items, where="candidates[{}]")
            values = np.empty(len(items))
            for start in range(0, len(items), batch_size):
                part = slice(start, start + batch_size)
                samples = scorer.score_batch(items[part], (rows[0][part], rows[1][part])).samples
                values[part] = [s["reward"] for s in samples]
                bar.update(1)
            out[name] = values
    info = {"index": str(index_dir), "retriever": retriever.spec, "fingerprint": retriever.fingerprint,
            "items": len(index), "random_init": retriever.random_init}
    return out, info


def check_query_ids(queries: Iterable[BenchQuery], known: Mapping[str, int] | set[str], index_name: str) -> None:
    """Refuse a query that names an id the training index does not hold, naming the query and the id."""
    for q in queries:
        for what, ids in (("target", q.target_ids), ("excluded id", q.excluded_ids),
                          ("reference", (q.reference_id,) if q.reference_id else ())):
            for item_id in ids:
                if item_id not in known:
                    raise BenchInputError(f"query {q.query_id!r} names {what} {item_id!r}, which the index "
                                          f"{index_name} does not hold")


# -- per-query statistics ---------------------------------------------------------------------------------------
def judge_metrics(judgement: Judgement, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Per candidate, the expected value of each metric under the judge (uniform tie-break among tied items).

    >>> j = Judgement(np.array([0, 0, 3]), np.array([0, 1, 0]))
    >>> {k: v.tolist() for k, v in judge_metrics(j, ["R@1", "MRR"]).items()}
    {'R@1': [1.0, 0.5, 0.0], 'MRR': [1.0, 0.75, 0.25]}
    """
    out = {}
    for metric in metrics:
        if metric == "MRR":
            out[metric] = expected_reciprocal_rank(judgement.above, judgement.tied)
        elif metric.startswith("R@"):
            out[metric] = expected_recall_at_k(judgement.above, judgement.tied, int(metric[2:]))
        else:
            raise ValueError(f"unknown metric {metric!r}")
    return out


def best_of_n(rewards: np.ndarray, values: np.ndarray) -> float:
    """The judge's value of the reward's pick: the mean over the candidates that share the best reward (the exact
    expectation of a uniform tie-break).

    >>> best_of_n(np.array([0.5, 1.0, 1.0]), np.array([1.0, 0.0, 1.0]))
    0.5
    """
    top = rewards == rewards.max()
    return float(values[top].mean())


def pair_counts(rewards: np.ndarray, utility: np.ndarray) -> tuple[int, int, int]:
    """Over the candidate pairs the judge orders (different utilities): how many the reward orders the same way,
    the other way, and how many it ties.

    >>> pair_counts(np.array([3.0, 2.0, 2.0]), np.array([1.0, 0.5, 0.0]))
    (2, 0, 1)
    """
    r = np.sign(rewards[:, None] - rewards[None, :])
    u = np.sign(utility[:, None] - utility[None, :])
    upper = np.triu(np.ones_like(r, dtype=bool), k=1) & (u != 0)
    return int(((r == u) & upper).sum()), int(((r == -u) & upper).sum()), int(((r == 0) & upper).sum())


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float | None:
    """Kendall's tau-b (ties in either variable accounted for); None when either is constant.

    >>> round(kendall_tau_b(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0])), 4)
    0.8165
    """
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    upper = np.triu(np.ones_like(sx, dtype=bool), k=1)
    tied_x, tied_y = ((sx == 0) & upper).sum(), ((sy == 0) & upper).sum()
    pairs = upper.sum()
    den = math.sqrt(float((pairs - tied_x) * (pairs - tied_y)))
    return None if den == 0 else float((sx * sy)[upper].sum() / den)


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when either is constant.

    >>> round(pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])), 4)
    0.9934
    """
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return None if den == 0 else float((dx * dy).sum() / den)


@dataclass
class QueryTable:
    """Per query (rows in query order) numerators and denominators of every statistic of one reward under one judge,
    in one pool of candidates."""

    columns: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, name: str, numerator: Sequence[float], denominator: Sequence[float] | None = None) -> None:
        num = np.asarray(numerator, dtype=np.float64)
        self.columns[name] = (num, np.ones_like(num) if denominator is None else np.asarray(denominator, float))


def query_table(rewards: np.ndarray, groups: Sequence[np.ndarray], metrics: Mapping[str, np.ndarray],
                utility: np.ndarray) -> QueryTable:
    """Every per-query statistic of one reward under one judge: best-of-N of each metric, pair counts, tau-b,
    Pearson, and whether the best reward is shared."""
    table = QueryTable()
    picks: dict[str, list[float]] = {m: [] for m in metrics}
    agree, disagree, ties, ordered, taus, tau_ok, rs, r_ok, top_tie = ([] for _ in range(9))
    for rows in groups:
        r, u = rewards[rows], utility[rows]
        for m, values in metrics.items():
            picks[m].append(best_of_n(r, values[rows]))
        a, d, t = pair_counts(r, u)
        agree.append(a)
        disagree.append(d)
        ties.append(t)
        ordered.append(a + d + t)
        tau, rho = kendall_tau_b(r, u), pearson(r, u)
        taus.append(tau or 0.0)
        tau_ok.append(tau is not None)
        rs.append(rho or 0.0)
        r_ok.append(rho is not None)
        top_tie.append(float((r == r.max()).sum() > 1))
    for m, values in picks.items():
        table.add(m, values)
    table.add("pairwise_agree", agree, ordered)
    table.add("pairwise_disagree", disagree, ordered)
    table.add("pairwise_tie", ties, ordered)
    table.add("kendall_tau_b", taus, tau_ok)
    table.add("pearson", rs, r_ok)
    table.add("top_tie_rate", top_tie)
    return table


# -- the benchmark ----------------------------------------------------------------------------------------------
@dataclass
class RewardBenchResult:
    """What :func:`run_reward_bench` found; ``to_json`` is the results file."""

    summary: dict[str, Any]
    picks: list[dict[str, Any]]
    """One row per (pool, reward, query): the candidates the reward ranks first (all of them when tied)."""
    scored: list[dict[str, Any]]
    """One row per candidate: its rewards and how each judge ranks its target."""


def run_reward_bench(
    queries: Sequence[BenchQuery],
    candidates: Sequence[BenchCandidate],
    reward_values: Mapping[str, np.ndarray],
    judges: Sequence[Judge],
    *,
    pools: Mapping[str, Sequence[str] | None] | None = None,
    baseline: str = BASELINE,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    judgements: Mapping[str, Judgement] | None = None,
    progress: bool = True,
) -> RewardBenchResult:
    """Judge every candidate, then compute every statistic of every reward under every judge, in every pool.

    Args:
        reward_values: per reward name, the reward of each candidate (:func:`score_candidates`), in candidate order.
        pools: which candidates a reward picks among, by name: a list of candidate kinds, or None for all
            (default: ``{"all": None}``).
        baseline: the reward every other is compared with (paired, on the same queries and resamples).
        judgements: judgements already made (by judge name), e.g. read back from a saved run.
    """
    from tqdm.auto import tqdm

    pools = dict(pools or {"all": None})
    if baseline not in reward_values:
        raise BenchInputError(f"the baseline reward {baseline!r} is not among the rewards {sorted(reward_values)}")
    if len(reward_values) < 2:
        raise BenchInputError("compare at least two rewards (the baseline and one more)")
    if not judges:
        raise BenchInputError("no judge: add --judge bm25 (with the corpus texts) or --judge INDEX_DIR")
    by_id = {q.query_id: q for q in queries}
    for name, values in reward_values.items():
        if len(values) != len(candidates):
            raise ValueError(f"reward {name!r} has {len(values)} values for {len(candidates)} candidates")
    made = dict(judgements or {})
    for judge in tqdm([j for j in judges if j.name not in made], desc="judge", unit="judge", disable=not progress):
        made[judge.name] = judge.judge(candidates, by_id)
    group_labels = [q.group for q in queries]
    hierarchical = len({g for g in group_labels}) >= 2 and all(g is not None for g in group_labels)
    summary: dict[str, Any] = {"baseline": baseline, "confidence": confidence, "resamples": resamples,
                               "hierarchical": hierarchical, "pools": {}, "judges": {},
                               "groups": sorted({str(g) for g in group_labels}) if hierarchical else []}
    picks: list[dict[str, Any]] = []
    for pool_name, kinds in pools.items():
        rows_of = _pool_rows(queries, candidates, kinds, pool_name)
        weights = {"queries": bootstrap.resample_weights(len(queries), None, resamples, seed)}
        if hierarchical:
            weights["groups"] = bootstrap.resample_weights(len(queries), group_labels, resamples, seed)
        pool: dict[str, Any] = {"kinds": list(kinds) if kinds else "all",
                                "candidates_per_query": _spread([len(r) for r in rows_of]), "judges": {}}
        for judge in judges:
            judgement = made[judge.name]
            metrics = judge_metrics(judgement, judge.metrics)
            utility = metrics["MRR"] if "MRR" in metrics else metrics["R@1"]
            tables = {name: query_table(values, rows_of, metrics, utility) for name, values in reward_values.items()}
            reference = _reference_rows(rows_of, metrics)
            pool["judges"][judge.name] = {
                "rewards": {name: _summarise(tables[name], tables[baseline], name == baseline, weights,
                                             group_labels if hierarchical else None, confidence)
                            for name in reward_values},
                "reference": {name: {m: _point(v, weights, confidence) for m, v in values.items()}
                              for name, values in reference.items()},
            }
        summary["pools"][pool_name] = pool
        for name, values in reward_values.items():
            for q, rows in zip(queries, rows_of):
                r = values[rows]
                top = [int(i) for i in rows[r == r.max()]]
                picks.append({"pool": pool_name, "reward": name, "query_id": q.query_id, "picked": top})
    for judge in judges:
        summary["judges"][judge.name] = judge.describe()
    scored = []
    for i, c in enumerate(candidates):
        row: dict[str, Any] = {"candidate": i, "query_id": c.query_id, "kind": c.kind, "rewrite": c.rewrite,
                               "rewards": {name: float(values[i]) for name, values in reward_values.items()},
                               "judges": {}}
        for judge in judges:
            j = made[judge.name]
            row["judges"][judge.name] = {"above": int(j.above[i]), "tied": int(j.tied[i])}
        scored.append(row)
    return RewardBenchResult(summary, picks, scored)


def _pool_rows(queries: Sequence[BenchQuery], candidates: Sequence[BenchCandidate], kinds: Sequence[str] | None,
               pool: str) -> list[np.ndarray]:
    rows: dict[str, list[int]] = {q.query_id: [] for q in queries}
    for i, c in enumerate(candidates):
        if kinds is None or c.kind in kinds:
            rows[c.query_id].append(i)
    short = [q for q, r in rows.items() if len(r) < 2]
    if short:
        raise BenchInputError(f"pool {pool!r}: {len(short)} queries have fewer than 2 candidates (first: "
                              f"{short[0]!r}); a reward can only pick among two or more")
    return [np.array(rows[q.query_id]) for q in queries]


def _reference_rows(rows_of: Sequence[np.ndarray], metrics: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """What no reward does worse than (a uniform random pick) or better than (the judge's own best pick)."""
    return {"random pick": {m: [float(v[r].mean()) for r in rows_of] for m, v in metrics.items()},
            "judge's best pick": {m: [float(v[r].max()) for r in rows_of] for m, v in metrics.items()}}


def _point(values: Sequence[float], weights: Mapping[str, np.ndarray], confidence: float) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "ci_queries": list(bootstrap.interval(weights["queries"], v, None, confidence))}


def _summarise(table: QueryTable, base: QueryTable, is_baseline: bool, weights: Mapping[str, np.ndarray],
               groups: Sequence[object] | None, confidence: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (num, den) in table.columns.items():
        stat: dict[str, Any] = {"value": bootstrap.ratio(num, den)}
        for level, w in weights.items():
            stat[f"ci_{level}"] = list(bootstrap.interval(w, num, den, confidence))
        if groups is not None:
            stat["per_group"] = {str(g): bootstrap.ratio(num[rows], den[rows])
                                 for g, rows in zip(sorted({str(x) for x in groups}),
                                                    bootstrap.group_rows([str(x) for x in groups], len(groups)))}
        if not is_baseline and np.all(den == 1) and np.all(base.columns[name][1] == 1):
            diff = num - base.columns[name][0]
            stat["vs_baseline"] = {"diff": float(diff.mean()),
                                   **{f"ci_{level}": list(bootstrap.interval(w, diff, None, confidence))
                                      for level, w in weights.items()}}
            if groups is not None:
                stat["vs_baseline"]["per_group"] = {
                    str(g): float(diff[rows].mean())
                    for g, rows in zip(sorted({str(x) for x in groups}),
                                       bootstrap.group_rows([str(x) for x in groups], len(groups)))}
        out[name] = stat
    return out


def _spread(values: Sequence[int]) -> dict[str, float]:
    return {"min": float(min(values)), "mean": float(np.mean(values)), "max": float(max(values))}
