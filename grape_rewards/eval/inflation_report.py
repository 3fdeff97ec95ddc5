"""Score-inflation report: similarity to the target versus to the best and the average non-target, per method.

GRAPE's observation: a raw-similarity reward teaches the rewriter to raise its similarity to *every*
corpus item, so ``target_sim`` rises while ``mean_sim`` and ``best_nontarget_sim`` rise with it and the
margin (hence the rank) does not improve. This module puts the distributions of the three similarities
and of the margin side by side, per method (the original queries, each rewrite file, or scored JSONL
files from ``grape-rewards score``), as numbers (JSON, markdown) and as a PNG plot.

>>> import numpy as np
>>> d = SimilarityDistribution("orig", {"target_sim": np.array([0.3, 0.6]), "best_nontarget_sim": np.array([0.4, 0.4]),
...                                    "mean_sim": np.array([0.1, 0.2])})
>>> s = summarize(d)
>>> s["count"], round(s["margin"]["mean"], 3), round(s["inflation_gap"], 3)
(2, 0.05, 0.3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..jsonl import jsonl_objects

if TYPE_CHECKING:
    from ..corpus.rank import RankStats

SIMILARITIES: tuple[str, ...] = ("target_sim", "best_nontarget_sim", "mean_sim")
"""The three similarities compared: to the (best) target, to the best non-target, to the average non-target."""
FIELDS: tuple[str, ...] = (*SIMILARITIES, "margin")
"""Every summarised field; ``margin`` = ``target_sim`` - ``best_nontarget_sim``."""
STATS: tuple[str, ...] = ("mean", "median", "p10", "p90")

_LABELS = {"target_sim": "target", "best_nontarget_sim": "best non-target", "mean_sim": "mean non-target"}
_COLOURS = {"target_sim": "#1b9e77", "best_nontarget_sim": "#d95f02", "mean_sim": "#7570b3"}


@dataclass
class SimilarityDistribution:
    """Per-query similarities of one method. ``values`` maps each of :data:`SIMILARITIES` (and,
    optionally, ``margin``, else derived) to a 1-D array, all of one length."""

    name: str
    values: dict[str, np.ndarray]
    source: str | None = None
    """Where the numbers came from (a file), for the report."""
    skipped: int = 0
    """Samples left out (no scorable rewrite)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [k for k in SIMILARITIES if k not in self.values]
        if missing:
            raise ValueError(f"method {self.name!r}: missing similarity arrays {missing}")
        self.values = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.values.items()}
        lengths = {k: len(v) for k, v in self.values.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"method {self.name!r}: arrays of different lengths {lengths}")
        if "margin" not in self.values:
            self.values["margin"] = self.values["target_sim"] - self.values["best_nontarget_sim"]

    def __len__(self) -> int:
        return len(self.values["target_sim"])


def from_rank_stats(name: str, stats: RankStats, source: str | None = None) -> SimilarityDistribution:
    """The distribution of a :class:`~grape_rewards.rewards.RankStats` (one row per query)."""
    return SimilarityDistribution(name, {
        "target_sim": stats.target_sim.double().numpy(),
        "best_nontarget_sim": stats.best_nontarget_sim.double().numpy(),
        "mean_sim": stats.mean_sim.double().numpy(),
    }, source=source)


def from_scored_jsonl(path: str | Path, name: str | None = None) -> SimilarityDistribution:
    """The distribution of a scored JSONL (the output of ``grape-rewards score``, or any rows carrying
    ``target_sim``, ``best_nontarget_sim`` and ``mean_sim``).

    Rows without a scorable rewrite (``num_tokens`` 0: the rewrite was empty or missing, and the scorer
    zeroed its similarities) are left out and counted in ``skipped``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scored JSONL not found: {path}")
    columns: dict[str, list[float]] = {k: [] for k in SIMILARITIES}
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for n, row in jsonl_objects(f, lambda n, problem: ValueError(f"{path}, line {n}: {problem}")):
            missing = [k for k in SIMILARITIES if not isinstance(row.get(k), (int, float))]
            if missing:
                raise ValueError(f"{path}, line {n}: missing numeric {missing} (score the file with "
                                 "`grape-rewards score` first)")
            if row.get("num_tokens", 1) == 0:
                skipped += 1
                continue
            for k in SIMILARITIES:
                columns[k].append(float(row[k]))
    if not columns["target_sim"]:
        raise ValueError(f"{path}: no scorable rows")
    return SimilarityDistribution(name or path.stem, {k: np.array(v) for k, v in columns.items()},
                                  source=str(path), skipped=skipped)


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "median": float(np.median(x)), "p10": float(np.percentile(x, 10)),
            "p90": float(np.percentile(x, 90))}


def summarize(dist: SimilarityDistribution) -> dict[str, Any]:
    """``{"count", "skipped", <field>: {mean, median, p10, p90} for each of FIELDS, "inflation_gap"}``.

    ``inflation_gap`` = mean(target_sim) - mean(mean_sim): how far the target stands above the corpus on
    average; a reward that inflates every score raises ``target_sim`` but not this gap (or the margin).
    """
    if len(dist) == 0:
        raise ValueError(f"method {dist.name!r} has no samples")
    out: dict[str, Any] = {"count": len(dist), "skipped": dist.skipped}
    if dist.source:
        out["source"] = dist.source
    for k in FIELDS:
        out[k] = _stats(dist.values[k])
    out["inflation_gap"] = out["target_sim"]["mean"] - out["mean_sim"]["mean"]
    out["margin_positive"] = float(np.mean(dist.values["margin"] > 0))
    return out


def inflation_markdown(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Two markdown tables: per method and field, the mean / median / p10 / p90; then per method the count,
    the inflation gap and the share of queries whose target beats every non-target.

    >>> s = {"m": {"count": 3, **{k: {stat: 0.5 for stat in STATS} for k in FIELDS}, "inflation_gap": 0.1,
    ...            "margin_positive": 1.0}}
    >>> print(inflation_markdown(s).splitlines()[2])
    | m | target_sim | 0.5000 | 0.5000 | 0.5000 | 0.5000 |
    """
    lines = ["| method | quantity | " + " | ".join(STATS) + " |", "|---|---|" + "---:|" * len(STATS)]
    for name, s in summaries.items():
        for i, k in enumerate(FIELDS):
            cells = [name if i == 0 else "", k] + [f"{s[k][stat]:.4f}" for stat in STATS]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | n | skipped | gap = mean(target_sim) - mean(mean_sim) | margin > 0 |",
              "|---|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['count']} | {s.get('skipped', 0)} | {s['inflation_gap']:.4f} | "
                     f"{100 * s['margin_positive']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot_inflation(dists: Sequence[SimilarityDistribution], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: per method, violins of the three similarities (left) and of the margin (right).

    Draws on matplotlib's Agg canvas directly (no display needed, pyplot's global backend untouched);
    needs ``pip install matplotlib``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise RuntimeError("the inflation plot needs matplotlib: pip install 'grape-rewards[eval]' "
                           "(or pip install matplotlib)") from None
    if not dists:
        raise ValueError("no methods to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(dists)
    fig = Figure(figsize=(max(8.0, 2.2 * n + 5), 4.5))
    FigureCanvasAgg(fig)
    ax_sim, ax_margin = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.26
    for j, key in enumerate(SIMILARITIES):
        positions = [i + (j - 1) * width for i in range(n)]
        data = [_plottable(d.values[key]) for d in dists]
        parts = ax_sim.violinplot(data, positions=positions, widths=width * 0.95, showmedians=True,
                                  showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(_COLOURS[key])
            body.set_edgecolor(_COLOURS[key])
            body.set_alpha(0.6)
        parts["cmedians"].set_color("black")
    ax_sim.set_xticks(range(n), [d.name for d in dists], rotation=20 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax_sim.set_ylabel("cosine similarity")
    ax_sim.set_title("similarity to the target vs. to non-targets")
    ax_sim.legend(handles=[Patch(color=_COLOURS[k], alpha=0.6, label=_LABELS[k]) for k in SIMILARITIES],
                  loc="best", fontsize="small")
    ax_sim.grid(axis="y", alpha=0.3)
    parts = ax_margin.violinplot([_plottable(d.values["margin"]) for d in dists], positions=range(n),
                                 showmedians=True, showextrema=False)
    for body in parts["bodies"]:
        body.set_facecolor("#666666")
        body.set_alpha(0.5)
    parts["cmedians"].set_color("black")
    ax_margin.axhline(0.0, color="red", linewidth=1, linestyle="--")
    ax_margin.set_xticks(range(n), [d.name for d in dists], rotation=20 if n > 3 else 0,
                         ha="right" if n > 3 else "center")
    ax_margin.set_title("margin\n(target - best non-target)")
    ax_margin.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _plottable(x: np.ndarray) -> np.ndarray:
    """Violin plots need some spread: a constant array gets a negligible jitter."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 1 or np.ptp(x) == 0:
        return np.concatenate([x, x[:1] + 1e-9])
    return x


def write_inflation_report(dists: Sequence[SimilarityDistribution], out_dir: str | Path, prefix: str = "inflation",
                           title: str | None = None, plot: bool = True) -> dict[str, Any]:
    """Write ``<prefix>.json``, ``<prefix>.md`` and (with ``plot``) ``<prefix>.png`` into ``out_dir``.

    Returns ``{"summaries": {method: summary}, "files": {"json", "md", "png"}}``.
    """
    from ..corpus.files import atomic_write_bytes, atomic_write_json

    names = [d.name for d in dists]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    out = Path(out_dir)
    summaries = {d.name: summarize(d) for d in dists}
    files = {"json": str(out / f"{prefix}.json"), "md": str(out / f"{prefix}.md")}
    atomic_write_json(files["json"], {"fields": list(FIELDS), "stats": list(STATS), "methods": summaries})
    heading = f"# Score inflation{': ' + title if title else ''}\n\n"
    atomic_write_bytes(files["md"], (heading + inflation_markdown(summaries)).encode("utf-8"))
    if plot:
        files["png"] = str(plot_inflation(dists, out / f"{prefix}.png", title=title))
    return {"summaries": summaries, "files": files}
