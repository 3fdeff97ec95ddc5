"""verl 0.9.1: the custom reward function, ``async compute_score``.

Point verl at it (installed package, every reward worker imports it)::

    reward.custom_reward_function.path=pkg://grape_rewards.adapters.verl
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.url=http://HOST:8000

or at a file path (``grape-rewards adapters path verl`` prints the installed one). verl calls it once per
sample, concurrently, on each reward worker's event loop, with ``solution_str`` = the response (special tokens
removed) and ``ground_truth`` = the parquet's ``reward_model.ground_truth`` (the label JSON written by
``grape-rewards prepare``). Options come from ``reward_kwargs`` (they win) or the ``GRAPE_*`` environment:
``url``/``GRAPE_REWARD_URL``, ``token``/``GRAPE_TOKEN``, ``timeout``, ``retries``; without a URL, in-process
scoring from ``index``/``GRAPE_INDEX`` (+ ``retriever``, ``reward_config``, ``device``), loaded once per worker
(verl's reward workers get no GPU: the service is the place for the retriever).

The answer is ``{"score": reward, <every key of sample_keys(config)>}``: the same numeric keys for every sample,
as verl requires (it indexes every sample by the first one's keys). Nothing comes back as None: a service
outage is retried, then raised as a RuntimeError that says what to check.

Importing this module imports only the standard library.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from grape_rewards.adapters import _common

__all__ = ["compute_score", "verl_result"]


def verl_result(sample: Mapping[str, Any]) -> dict[str, float]:
    """verl's dict for one scored sample: ``score`` first, then every statistic (floats, finite).

    >>> verl_result({"reward": 0.5, "rank": 3.0})
    {'score': 0.5, 'reward': 0.5, 'rank': 3.0}
    """
    out = {"score": _common.finite(sample["reward"])}
    out.update({str(k): _common.finite(v) for k, v in sample.items()})
    return out


async def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None,
                        **kwargs: Any) -> dict[str, float]:
    """The reward of one verl sample.

    Args:
        data_source: the parquet's ``data_source`` (not used: the label says everything).
        solution_str: the response text.
        ground_truth: the label (JSON string or object, see :mod:`grape_rewards.labels`).
        extra_info: the row's ``extra_info`` (read-only; not used).
        kwargs: ``reward_kwargs`` from the config (settings), plus whatever verl adds (ignored).
    """
    settings = _common.resolve_settings(kwargs)
    _common.require_backend(settings)
    item = _common.item_fields(ground_truth, solution_str, "ground_truth")
    if settings.mode == "service":
        from grape_rewards.client import RewardServiceError

        try:
            results = await _common.async_client(settings).score([item])
        except RewardServiceError as exc:
            raise _common.service_error(exc, settings) from exc
        if not isinstance(results, list) or len(results) != 1 or "reward" not in results[0]:
            raise RuntimeError(f"grape-rewards: unexpected /v1/rewards answer: {str(results)[:200]}")
        return verl_result(results[0])
    samples = await asyncio.to_thread(_score_in_process, settings, item)
    return verl_result(samples[0])


def _score_in_process(settings: _common.AdapterSettings, item: dict[str, Any]) -> list[dict[str, float]]:
    """Load the scorer on first use (in a worker thread, off the event loop) and score one item."""
    return _common.in_process(settings).score_dicts([item], "ground_truth")
