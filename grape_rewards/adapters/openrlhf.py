"""OpenRLHF 0.11.2: the ``.py`` reward mode (``--reward.remote_url /path/reward_func.py``).

OpenRLHF's HTTP mode needs no adapter: point ``--reward.remote_url`` at the service's ``/get_reward``
(several URLs, comma-separated, are used round-robin). The ``.py`` mode loads a file by path and calls
``reward_func(queries, prompts, labels)`` on worker threads, one sample per call, many at once, inside every
vLLM engine. ``grape-rewards adapters path openrlhf`` prints the installed file to pass; it re-exports
:func:`reward_func` from here. The file is loaded outside ``sys.modules``, so settings come from the
environment of the engine processes:

- ``GRAPE_REWARD_URL=http://HOST:PORT`` (+ ``GRAPE_TOKEN``, ``GRAPE_REWARD_TIMEOUT``, ``GRAPE_REWARD_RETRIES``):
  forward every call to the service (the default to use: the retriever lives on its own GPU);
- otherwise ``GRAPE_INDEX=DIR`` (+ ``GRAPE_RETRIEVER``, ``GRAPE_REWARD_CONFIG``, ``GRAPE_DEVICE``): load the
  retriever and the index once per process and score in it; concurrent calls share batches.

The answer has OpenRLHF's shape, as tensors: ``{"rewards": (n,), "scores": (n,) in [0, 1], "extra_logs":
{name: (n,)}}``, the same numbers the service's ``/get_reward`` returns. A failure never comes back as a silent
None: a service outage is retried (exponential backoff), then raised as a RuntimeError that says what to
check, and logged at ERROR (OpenRLHF itself logs a failed reward only at INFO, then fails the step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from grape_rewards.adapters import _common

__all__ = ["reward_func", "reward_lists"]


def reward_lists(queries: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[Any],
                 **options: Any) -> dict[str, Any]:
    """``{"rewards": [float], "scores": [float], "extra_logs": {name: [float]}}`` (plain lists) for a batch.

    ``options`` are adapter settings (``url``, ``token``, ``index`` ...) over the ``GRAPE_*`` environment.
    """
    settings = _common.resolve_settings(options)
    _common.require_backend(settings)
    queries, labels = list(queries), list(labels)
    if len(labels) != len(queries) or (prompts is not None and len(prompts) != len(queries)):
        raise ValueError(f"grape-rewards: got {len(queries)} queries, {len(labels)} labels and "
                         f"{'no' if prompts is None else len(prompts)} prompts; expected one of each per sample")
    if not queries:
        return {"rewards": [], "scores": [], "extra_logs": {}}
    if settings.mode == "service":
        from grape_rewards.client import RewardServiceError

        try:
            out = _common.sync_client(settings).get_reward(queries, None if prompts is None else list(prompts),
                                                           labels)
        except RewardServiceError as exc:
            raise _common.service_error(exc, settings) from exc
        return _check_answer(out, len(queries))
    return _score_in_process(settings, queries, prompts, labels)


def _score_in_process(settings: _common.AdapterSettings, queries: list[str], prompts: Sequence[str] | None,
                      labels: list[Any]) -> dict[str, Any]:
    """The scorer's answer, shaped as the service's ``/get_reward`` answer (no request built or parsed)."""
    from grape_rewards.framework_io import openrlhf_answer, openrlhf_item
    from grape_rewards.labels import LabelError, parse_label

    local = _common.in_process(settings)
    items = []
    for i, (query, label) in enumerate(zip(queries, labels)):
        prompt = None if prompts is None else prompts[i]
        if not isinstance(query, str) or not (prompt is None or isinstance(prompt, str)):
            raise ValueError(f"grape-rewards: queries[{i}] and prompts[{i}] must be strings")
        try:
            items.append(openrlhf_item(query, prompt, parse_label(label)))
        except LabelError as exc:
            raise ValueError(f"grape-rewards: labels[{i}]: {exc}") from None
    return openrlhf_answer(local.score(items, "labels[{}]"), local.scorer.config)


def _check_answer(out: Any, n: int) -> dict[str, Any]:
    """Refuse an answer OpenRLHF would choke on later (wrong length, non-numbers) with a clear error now."""
    if not isinstance(out, Mapping) or not isinstance(out.get("rewards"), list) or len(out["rewards"]) != n:
        raise RuntimeError(f"grape-rewards: the service's /get_reward answer has no list of {n} rewards: "
                           f"{str(out)[:200]}")
    rewards = [_common.finite(r) for r in out["rewards"]]
    scores = out.get("scores")
    scores = [_common.finite(s) for s in scores] if isinstance(scores, list) and len(scores) == n else rewards
    logs = {str(k): [_common.finite(x) for x in v] for k, v in (out.get("extra_logs") or {}).items()
            if isinstance(v, list) and len(v) == n}
    return {"rewards": rewards, "scores": scores, "extra_logs": logs}


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any],
                **kwargs: Any) -> dict[str, Any]:
    """OpenRLHF's ``.py`` reward: ``{"rewards", "scores", "extra_logs"}`` as float32 tensors, one value per query.

    Args:
        queries: templated prompt + response, special tokens kept (what OpenRLHF decodes).
        prompts: the templated prompts (the response is what follows the prompt, or the last assistant header).
        labels: the dataset's ``--data.label_key`` column: the label JSON (``{"target_ids": [...], ...}``).
        kwargs: adapter settings (``url``, ``index`` ...) overriding the ``GRAPE_*`` environment variables.

    Thread-safe: OpenRLHF calls it from many threads at once (the in-process scorer batches them together).
    """
    import torch

    out = reward_lists(queries, prompts, labels, **kwargs)

    def tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32)

    return {"rewards": tensor(out["rewards"]), "scores": tensor(out["scores"]),
            "extra_logs": {k: tensor(v) for k, v in out["extra_logs"].items()}}
