"""TRL (``GRPOTrainer``): reward functions, sync and async, as picklable objects (and their factories).

    from grape_rewards.adapters.trl import make_reward_func
    trainer = GRPOTrainer(model=..., reward_funcs=[make_reward_func(url="http://127.0.0.1:8000")],
                          train_dataset=load_dataset("json", data_files="prepared/trl/train.jsonl")["train"], ...)

TRL calls ``fn(prompts=..., completions=..., completion_ids=..., **columns)`` with every dataset column as a
list aligned with the completions. The function reads each sample's target from a label column (``grape_label``,
the label JSON written by ``grape-rewards prepare``; else ``label`` or ``target_ids``) and returns one float per
completion. It also logs the mean rank, recall@k, similarities and format rate through TRL's ``log_metric``
(``grape/<key>``), the reward-hacking alarm flags (``grape/alarm_<name>``, 1.0 while an alarm is on) and, with
an ensemble of retrievers, each one's rank (``grape/retriever_<j>_rank``).

Backends, in order: an explicit ``scorer`` (a :class:`~grape_rewards.scorer.RewardScorer`, for notebooks and
tests), the service at ``url`` (or ``GRAPE_REWARD_URL``), else in-process from ``index`` (or ``GRAPE_INDEX``).
A service outage is retried, then raised as a RuntimeError; a reward never comes back as None.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from grape_rewards.adapters import _common

if TYPE_CHECKING:
    from grape_rewards.scorer import RewardScorer

__all__ = ["DEFAULT_LOG_KEYS", "LABEL_COLUMNS", "AsyncRewardFunc", "RewardFunc", "completion_text",
           "make_async_reward_func", "make_reward_func"]

LABEL_COLUMNS: tuple[str, ...] = ("grape_label", "label", "target_ids")
"""Dataset columns searched for each row's label, in order, when no ``label_column`` is given."""

DEFAULT_LOG_KEYS: tuple[str, ...] = ("rank", "recall_at_1", "recall_at_10", "target_sim", "margin", "format_ok")
"""Statistics logged (batch means) as ``grape/<key>`` through TRL's ``log_metric``."""


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or (conversational datasets) a list of messages.

    >>> completion_text("a dog"), completion_text([{"role": "assistant", "content": "a cat"}])
    ('a dog', 'a cat')
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a cow"}]}])
    'a cow'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise ValueError(f"grape-rewards: cannot read a completion of type {type(completion).__name__}: "
                     f"{str(completion)[:120]}")


class RewardFunc:
    """A synchronous TRL reward function ``(prompts, completions, **columns) -> list[float]``.

    An object, not a closure, so that it pickles (TRL, ``accelerate`` and ``datasets`` may copy what they are
    given to other processes): it holds only its settings, and the client or the in-process scorer is found (or
    loaded) in each process on first use. One built around an explicit ``scorer`` holds that scorer and pickles
    only if it does.

    Args:
        url: the reward service's base URL(s) (default ``GRAPE_REWARD_URL``).
        token, timeout, retries: service client settings (defaults from ``GRAPE_*``).
        index, retriever, reward_config, device: in-process scoring when no URL is given.
        scorer: score with this already loaded scorer (ignores the settings above).
        label_column: the dataset column holding each row's label (default: the first of :data:`LABEL_COLUMNS`
            present: ``grape_label``, written by ``grape-rewards prepare``, then ``label``, then ``target_ids``).
        name: the function's ``__name__`` (TRL logs ``rewards/<name>/mean``).
        log_keys: statistics logged as ``grape/<key>`` (batch means) through TRL's ``log_metric``.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, timeout: float | None = None,
                 retries: int | None = None, index: str | None = None, retriever: str | None = None,
                 reward_config: str | None = None, device: str | None = None, scorer: RewardScorer | None = None,
                 label_column: str | None = None, name: str = "grape_reward",
                 log_keys: Sequence[str] = DEFAULT_LOG_KEYS) -> None:
        self.__name__ = self.__qualname__ = name
        self.scorer = scorer
        self.settings = _common.resolve_settings(dict(url=url, token=token, timeout=timeout, retries=retries,
                                                      index=index, retriever=retriever,
                                                      reward_config=reward_config, device=device))
        if scorer is None:
            _common.require_backend(self.settings)
        self.label_column = label_column
        self.log_keys = tuple(log_keys)

    def __repr__(self) -> str:
        backend = "scorer" if self.scorer is not None else self.settings.mode
        return f"{type(self).__name__}(name={self.__name__!r}, backend={backend!r})"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        items = self.items(completions, columns)
        return self.finish(self.score_sync(items), len(items), columns)

    def items(self, completions: Sequence[Any], columns: dict[str, Any]) -> list[dict[str, Any]]:
        """The native reward item of each completion, with the label read from the dataset's label column."""
        candidates = (self.label_column,) if self.label_column else LABEL_COLUMNS
        labels = next((columns[c] for c in candidates if columns.get(c) is not None), None)
        if labels is None:
            known = sorted(k for k in columns if k not in ("trainer_state", "log_extra", "log_metric"))
            raise KeyError(f"grape-rewards: the dataset has no label column (looked for {', '.join(candidates)}); "
                           f"columns seen: {known}. Pass label_column= to the reward factory.")
        if len(labels) != len(completions):
            raise ValueError(f"grape-rewards: {len(completions)} completions but {len(labels)} labels")
        return [_common.item_fields(label, completion_text(c), f"labels[{i}]")
                for i, (c, label) in enumerate(zip(completions, labels))]

    def score_sync(self, items: list[dict[str, Any]]) -> list[dict[str, float]]:
        if self.scorer is not None:
            from grape_rewards.scorer import RewardItem

            return self.scorer.score([RewardItem(**item) for item in items])
        if self.settings.mode == "service":
            from grape_rewards.client import RewardServiceError

            try:
                return _common.sync_client(self.settings).score(items)
            except RewardServiceError as exc:
                raise _common.service_error(exc, self.settings) from exc
        return _common.in_process(self.settings).score_dicts(items, "labels[{}]")

    def finish(self, samples: list[dict[str, float]], n: int, columns: dict[str, Any]) -> list[float]:
        """The rewards of ``samples``, after logging the batch means of :attr:`log_keys` through ``log_metric``."""
        if len(samples) != n:
            raise RuntimeError(f"grape-rewards: scored {n} completions but got {len(samples)} results")
        log_metric = columns.get("log_metric")
        if callable(log_metric) and samples:
            extra = tuple(k for k in samples[0] if k.startswith(("retriever_", "alarm_")))  # ensemble ranks, alarms
            for key in (*self.log_keys, *extra):
                if key in samples[0]:
                    log_metric(f"grape/{key}", sum(_common.finite(s[key]) for s in samples) / len(samples))
        return [_common.finite(s["reward"]) for s in samples]


class AsyncRewardFunc(RewardFunc):
    """The ``async`` twin of :class:`RewardFunc` (TRL runs async reward functions concurrently); picklable too."""

    async def __call__(  # type: ignore[override]
            self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        items = self.items(completions, columns)
        return self.finish(await self.score_async(items), len(items), columns)

    async def score_async(self, items: list[dict[str, Any]]) -> list[dict[str, float]]:
        if self.scorer is None and self.settings.mode == "service":
            from grape_rewards.client import RewardServiceError

            try:
                return await _common.async_client(self.settings).score(items)
            except RewardServiceError as exc:
                raise _common.service_error(exc, self.settings) from exc
        return await asyncio.to_thread(self.score_sync, items)


def make_reward_func(url: str | None = None, *, token: str | None = None, timeout: float | None = None,
                     retries: int | None = None, index: str | None = None, retriever: str | None = None,
                     reward_config: str | None = None, device: str | None = None,
                     scorer: RewardScorer | None = None, label_column: str | None = None,
                     name: str = "grape_reward", log_keys: Sequence[str] = DEFAULT_LOG_KEYS) -> RewardFunc:
    """A synchronous TRL reward function: a :class:`RewardFunc` (its arguments are documented there)."""
    return RewardFunc(url, token=token, timeout=timeout, retries=retries, index=index, retriever=retriever,
                      reward_config=reward_config, device=device, scorer=scorer, label_column=label_column,
                      name=name, log_keys=log_keys)


def make_async_reward_func(url: str | None = None, *, token: str | None = None, timeout: float | None = None,
                           retries: int | None = None, index: str | None = None, retriever: str | None = None,
                           reward_config: str | None = None, device: str | None = None,
                           scorer: RewardScorer | None = None, label_column: str | None = None,
                           name: str = "grape_reward",
                           log_keys: Sequence[str] = DEFAULT_LOG_KEYS) -> AsyncRewardFunc:
    """An ``async`` TRL reward function: an :class:`AsyncRewardFunc` (arguments as for :class:`RewardFunc`)."""
    return AsyncRewardFunc(url, token=token, timeout=timeout, retries=retries, index=index, retriever=retriever,
                           reward_config=reward_config, device=device, scorer=scorer, label_column=label_column,
                           name=name, log_keys=log_keys)
