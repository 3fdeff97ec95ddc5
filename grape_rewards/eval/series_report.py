"""The Grafana dashboard's reward series as one PNG, from a scored JSONL (for people without Grafana).

``grape-rewards series-report --scored scored.jsonl --out report.png`` reads the rows of ``grape-rewards score``
(in the order they were scored, e.g. the rollouts of a run dumped step by step), cuts them into consecutive
windows of ``--window`` rows and plots each window's mean: the reward, the rank, recall@k, the similarity to the
target versus the mean and the best non-target, the margin and the inflation gap, the rewrite length, the
format-failure and truncation rates, and the reward-hacking alarm flags the scorer attached to each row
(``alarm_<name>``). The numbers go to a JSON file beside the PNG.

>>> rows = [{"reward": r, "rank": 1.0, "target_sim": 0.5, "mean_sim": 0.1, "format_ok": 1.0, "num_tokens": 3.0}
...         for r in (0.0, 1.0, 1.0, 1.0)]
>>> s = window_series(rows, window=2)
>>> s["end"].tolist(), s["reward"].tolist(), s["inflation_gap"].tolist()
([2, 4], [0.5, 1.0], [0.4, 0.4])
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..jsonl import jsonl_objects

PER_SAMPLE: tuple[str, ...] = ("reward", "part_rank", "rank", "recall_at_1", "recall_at_5", "recall_at_10",
                               "format_ok", "truncated")
"""Window means over every row."""
PER_REWRITE: tuple[str, ...] = ("target_sim", "mean_sim", "best_nontarget_sim", "margin", "num_tokens")
"""Window means over the rows that had a rewrite (the others carry placeholder similarities)."""

_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward", "part_rank")),
    ("rank (mean)", ("rank",)),
    ("recall@k", ("recall_at_1", "recall_at_5", "recall_at_10")),
    ("target vs mean similarity", ("target_sim", "best_nontarget_sim", "mean_sim")),
    ("margin and inflation gap", ("margin", "inflation_gap")),
    ("rewrite length (tokens)", ("num_tokens",)),
    ("format failures and truncation", ("format_failure", "truncated")),
    ("reward-hacking alarms", ()),  # every alarm_<name> column
)


def read_scored(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a scored JSONL (``grape-rewards score`` output); each needs ``reward``."""
    def error(n: int, problem: str) -> ValueError:
        return ValueError(f"{path}:{n}: {problem}")

    with open(path, encoding="utf-8") as f:
        rows = [row for _, row in jsonl_objects(f, error)]
    for n, row in enumerate(rows, start=1):
        if not isinstance(row.get("reward"), (int, float)):
            raise ValueError(f"{path}: row {n} has no numeric 'reward': is it the output of grape-rewards score?")
    if not rows:
        raise ValueError(f"{path}: no scored rows")
    return rows


def window_series(rows: Sequence[Mapping[str, Any]], window: int) -> dict[str, np.ndarray]:
    """Per consecutive window of ``window`` rows (the last one may be shorter): ``end`` (rows so far) and the mean
    of each field present (:data:`PER_SAMPLE`, :data:`PER_REWRITE`, ``inflation_gap``, ``format_failure``, and every
    ``alarm_<name>`` column). A window without a rewrite has NaN similarities."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    alarms = sorted(k for k in present if k.startswith("alarm_"))
    out: dict[str, list[float]] = {"end": []}
    for start in range(0, len(rows), window):
        chunk = rows[start:start + window]
        out["end"].append(start + len(chunk))
        rewrites = [r for r in chunk if r.get("format_ok") == 1.0 or float(r.get("num_tokens", 0.0)) > 0.0]
        for key in (*PER_SAMPLE, *alarms):
            if key in present:
                out.setdefault(key, []).append(_mean([r.get(key) for r in chunk]))
        for key in PER_REWRITE:
            if key in present:
                out.setdefault(key, []).append(_mean([r.get(key) for r in rewrites]))
        if "target_sim" in present and "mean_sim" in present:
            out.setdefault("inflation_gap", []).append(
                _mean([float(r["target_sim"]) - float(r["mean_sim"]) for r in rewrites]))
        if "format_ok" in present:
            out.setdefault("format_failure", []).append(1.0 - len(rewrites) / len(chunk))
    return {k: np.asarray(v, dtype=np.float64 if k != "end" else np.int64) for k, v in out.items()}


def _mean(values: Sequence[Any]) -> float:
    xs = [float(v) for v in values if v is not None]
    return float(np.mean(xs)) if xs else float("nan")


def plot_series(series: Mapping[str, np.ndarray], title: str | None = None) -> bytes:
    """The PNG (bytes) of the dashboard's panels over the windows (matplotlib's Agg canvas; no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("the series report needs matplotlib: pip install 'grape-rewards[eval]' "
                           "(or pip install matplotlib)") from None
    x = series["end"]
    alarms = [k for k in series if k.startswith("alarm_")]
    fig = Figure(figsize=(13, 11))
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 2, sharex=True).ravel()
    for ax, (name, keys) in zip(axes, _PANELS):
        shown = [k for k in (keys or alarms) if k in series]
        for k in shown:
            if keys:
                ax.plot(x, series[k], marker=".", label=k)
            else:
                ax.step(x, series[k], where="pre", label=k.removeprefix("alarm_"))
        if not keys:
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(name if shown else f"{name} (not in the file)", fontsize="medium")
        ax.grid(alpha=0.3)
        if shown:
            ax.legend(fontsize="x-small", loc="best")
    for ax in axes[-2:]:
        ax.set_xlabel("samples scored")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_series_report(scored: str | Path, out: str | Path, window: int = 256, title: str | None = None
                        ) -> dict[str, str]:
    """Write ``out`` (PNG) and ``out`` with ``.json`` (the window means); return the two paths."""
    from ..corpus.files import atomic_write_bytes, atomic_write_json

    series = window_series(read_scored(scored), window)
    out = Path(out)
    files = {"png": str(out), "json": str(out.with_suffix(".json"))}
    png = plot_series(series, title or Path(scored).name)
    atomic_write_json(files["json"], {"window": window, "source": str(scored),
                                      "series": {k: [None if v != v else v for v in a.tolist()]
                                                 for k, a in series.items()}})
    atomic_write_bytes(files["png"], png)
    return files
