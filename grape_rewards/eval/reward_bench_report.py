"""The reward benchmark's outputs: ``reward-bench.json`` (every figure), ``reward-bench.md`` (the tables),
``reward-bench.png`` (best-of-N Recall@1 per reward and judge, with intervals), ``picks.jsonl`` (what each reward
picked) and ``scored.jsonl`` (every candidate's rewards and judgements), all written atomically."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..corpus.files import atomic_write, atomic_write_bytes, atomic_write_json
from .reward_bench import RewardBenchResult

PICK_METRICS = ("R@1", "R@5", "R@10", "MRR")


def pct(value: float) -> str:
    """A fraction as a percentage with one decimal.

    >>> pct(0.4567), pct(float("nan"))
    ('45.7', '-')
    """
    return "-" if value != value else f"{100 * value:.1f}"


def _ci(stat: Mapping[str, Any], key: str, scale: float = 100.0) -> str:
    lo, hi = stat.get(key, (float("nan"), float("nan")))
    if lo != lo:
        return ""
    return f" [{scale * lo:.1f}, {scale * hi:.1f}]" if scale == 100.0 else f" [{lo:+.3f}, {hi:+.3f}]"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def corr(value: float) -> str:
    """A correlation, or a dash where it is undefined (no group in which both vary).

    >>> corr(0.5), corr(float("nan"))
    ('+0.500', '-')
    """
    return "-" if value != value else f"{value:+.3f}"


def markdown(summary: Mapping[str, Any], title: str = "Reward benchmark") -> str:
    """The tables: per pool and judge, each reward's best-of-N metrics, its difference from the baseline, pairwise
    agreement, top-tie rate and within-group correlations."""
    baseline = summary["baseline"]
    level = "groups" if summary.get("hierarchical") else "queries"
    inputs = summary.get("inputs", {})
    lines = [f"# {title}", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    if inputs:
        lines += [f"Training index: `{inputs.get('index')}` ({inputs.get('retriever')}, {inputs.get('items')} items). "
                  f"{inputs.get('queries')} queries, {inputs.get('candidates')} candidates "
                  f"({', '.join(f'{k}: {v}' for k, v in inputs.get('kinds', {}).items())}).", ""]
        if inputs.get("random_init"):
            lines += ["**The training retriever is RANDOM-INIT: these figures carry no meaning.**", ""]
    lines += [f"Best-of-N: the judge's metric of the candidate each reward ranks first (ties: the exact expectation of "
              f"a uniform pick). Intervals: {100 * summary['confidence']:.0f}% bootstrap over queries"
              + (", and over groups (seeds) then queries, second" if summary.get("hierarchical") else "")
              + f". Differences are paired against `{baseline}`. Figures in %, correlations in [-1, 1].", ""]
    for pool_name, pool in summary["pools"].items():
        kinds = "every kind" if pool["kinds"] == "all" else "kind " + ", ".join(pool["kinds"])
        spread = pool["candidates_per_query"]
        lines += [f"## Pool `{pool_name}`: candidates of {kinds} ({spread['mean']:.1f} per query)", ""]
        for judge_name, judged in pool["judges"].items():
            judge = summary["judges"][judge_name]
            seen = " (the training retriever: not an unseen judge)" if judge.get("seen_in_training") else ""
            lines += [f"### Judge `{judge_name}` ({judge['kind']}){seen}", ""]
            metrics = [m for m in PICK_METRICS if m in judge["metrics"]]
            header = ["reward", *[f"{m} of the pick" for m in metrics[:1]], f"{metrics[0]} − {baseline}",
                      *[f"{m}" for m in metrics[1:]], "pairs agree / disagree / tie", "top ties", "tau-b", "pearson"]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for name, stats in judged["rewards"].items():
                first = stats[metrics[0]]
                cell = pct(first["value"]) + _ci(first, "ci_queries")
                if summary.get("hierarchical"):
                    cell += _ci(first, "ci_groups")
                diff = "" if name == baseline else (_signed(first["vs_baseline"]["diff"])
                                                    + _ci(first["vs_baseline"], f"ci_{level}"))
                rest = [pct(stats[m]["value"]) for m in metrics[1:]]
                pairs = " / ".join(pct(stats[k]["value"]) for k in ("pairwise_agree", "pairwise_disagree",
                                                                   "pairwise_tie"))
                lines.append("| " + " | ".join([f"`{name}`", cell, diff, *rest, pairs,
                                                 pct(stats["top_tie_rate"]["value"]),
                                                 corr(stats["kendall_tau_b"]["value"]),
                                                 corr(stats["pearson"]["value"])]) + " |")
            for name, values in judged["reference"].items():
                lines.append("| " + " | ".join([f"*{name}*", pct(values[metrics[0]]["mean"]), "",
                                                 *[pct(values[m]["mean"]) for m in metrics[1:]], "", "", "", ""])
                             + " |")
            lines.append("")
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: Path) -> None:
    """Best-of-N Recall@1 per reward (rows) under each judge (panels), first pool, with query intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pool_name, pool = next(iter(summary["pools"].items()))
    judges = list(pool["judges"])
    rewards = list(next(iter(pool["judges"].values()))["rewards"])
    fig, axes = plt.subplots(1, len(judges), figsize=(3.6 * len(judges) + 1.5, 0.35 * len(rewards) + 1.6),
                             sharey=True, squeeze=False)
    for ax, judge_name in zip(axes[0], judges):
        stats = pool["judges"][judge_name]["rewards"]
        values = [100 * stats[r]["R@1"]["value"] for r in rewards]
        lo = [100 * stats[r]["R@1"]["ci_queries"][0] for r in rewards]
        hi = [100 * stats[r]["R@1"]["ci_queries"][1] for r in rewards]
        colours = ["tab:gray" if r == summary["baseline"] else "tab:blue" for r in rewards]
        y = range(len(rewards))
        ax.barh(y, values, color=colours, alpha=0.8)
        ax.errorbar(values, y, xerr=[[v - a for v, a in zip(values, lo)], [b - v for v, b in zip(values, hi)]],
                    fmt="none", ecolor="black", capsize=2, lw=0.8)
        ax.set_title(f"judge: {judge_name}", fontsize=9)
        ax.set_xlabel("R@1 of the best-of-N pick (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(list(range(len(rewards))), rewards)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"Which reward picks the rewrite that retrieves better? (pool: {pool_name})", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_reward_bench(result: RewardBenchResult, out: str | Path, *, title: str = "Reward benchmark",
                       name: str = "reward-bench", plot_png: bool = True) -> dict[str, str]:
    """Write the json, md, png and the JSONL files into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / f"{name}.json", "md": out / f"{name}.md", "picks": out / "picks.jsonl",
             "scored": out / "scored.jsonl"}
    atomic_write_json(files["json"], result.summary)
    atomic_write_bytes(files["md"], markdown(result.summary, title).encode("utf-8"))
    for key, rows in (("picks", result.picks), ("scored", result.scored)):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_bytes(files[key], text.encode("utf-8"))
    if plot_png and importlib.util.find_spec("matplotlib") is not None:  # the figure needs matplotlib (the eval extra)
        files["png"] = out / f"{name}.png"
        plot(result.summary, files["png"])
    return {k: str(v) for k, v in files.items()}
