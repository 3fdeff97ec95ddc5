"""What the framework adapters share: settings (keyword arguments over environment variables), the service
clients (one per process, per event loop for the async one), the lazily loaded in-process scorer, and a
thread micro-batcher.

Imports only the standard library (and the light index-list parser) at module level (verl imports the adapters
in every reward worker); httpx, pydantic and torch load on first use.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from grape_rewards.index_list import parse_index_list

if TYPE_CHECKING:
    from grape_rewards.client import AsyncRewardClient, RewardClient
    from grape_rewards.scorer import RewardItem, RewardScorer

logger = logging.getLogger("grape_rewards.adapters")

ENV_VARS: dict[str, str] = {
    "url": "GRAPE_REWARD_URL",
    "token": "GRAPE_TOKEN",
    "timeout": "GRAPE_REWARD_TIMEOUT",
    "retries": "GRAPE_REWARD_RETRIES",
    "index": "GRAPE_INDEX",
    "retriever": "GRAPE_RETRIEVER",
    "reward_config": "GRAPE_REWARD_CONFIG",
    "device": "GRAPE_DEVICE",
}
"""Setting -> the environment variable it is read from when no keyword argument gives it."""

NO_BACKEND = (
    "grape-rewards: no reward backend configured. Point the adapter at the reward service "
    "(`grape-rewards serve --index DIR`): set GRAPE_REWARD_URL=http://HOST:PORT (verl: "
    "+reward.custom_reward_function.reward_kwargs.url=http://HOST:PORT; TRL: make_reward_func(url=...)); "
    "or score in-process by naming an index: GRAPE_INDEX=DIR (and optionally GRAPE_RETRIEVER, GRAPE_REWARD_CONFIG, "
    "GRAPE_DEVICE)."
)


@dataclass(frozen=True)
class AdapterSettings:
    """Where rewards come from. ``url`` set: the service; else ``index`` set: in-process; else an error."""

    url: str | None = None
    """Base URL(s) of the reward service, comma-separated (``/get_reward`` suffixes are accepted)."""
    token: str | None = None
    """Bearer token of the service (the server's ``GRAPE_TOKEN``)."""
    timeout: float = 60.0
    """Seconds per HTTP attempt."""
    retries: int | None = None
    """Extra attempts after the first on connection errors, timeouts, 429 and 5xx (exponential backoff); None: the
    client's default (:data:`grape_rewards.client.DEFAULT_RETRIES`, 22.75-45.5 s of waiting: outlasts a restart)."""
    index: str | None = None
    """In-process mode: the index folder; several (comma-separated, or a list) make an ensemble of their retrievers."""
    retriever: str | None = None
    """In-process mode: retriever spec (default: the one recorded in the index manifest)."""
    reward_config: str | None = None
    """In-process mode: a RewardConfig YAML file (default: RewardConfig())."""
    device: str = "auto"
    """In-process mode: cpu, cuda, cuda:N or auto."""

    @property
    def mode(self) -> str:
        """``service``, ``in_process`` or ``none``."""
        if self.url:
            return "service"
        return "in_process" if self.index else "none"


_FIELDS = tuple(f.name for f in fields(AdapterSettings))
IGNORED_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})
"""Keyword arguments the frameworks add to a reward call that are not settings (verl's reward-model router)."""
_warned_unknown: set[str] = set()


def resolve_settings(overrides: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None) -> AdapterSettings:
    """Settings from ``overrides`` (keyword arguments; None values ignored) over ``GRAPE_*`` environment variables.

    >>> resolve_settings({"url": "http://h:8000", "retries": "2"}, environ={"GRAPE_REWARD_TIMEOUT": "5"})
    AdapterSettings(url='http://h:8000', token=None, timeout=5.0, retries=2, index=None, retriever=None, \
reward_config=None, device='auto')
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        value = environ.get(var)
        if value is not None and value.strip():
            values[name] = value.strip()
    for name, value in (overrides or {}).items():
        if name in _FIELDS:
            if value is not None and value != "":
                values[name] = value
        elif name not in IGNORED_KWARGS and name not in _warned_unknown:
            _warned_unknown.add(name)
            logger.warning("grape-rewards: ignoring unknown reward option %r (known: %s)", name, ", ".join(_FIELDS))
    try:
        if "timeout" in values:
            values["timeout"] = float(values["timeout"])
        if "retries" in values:
            values["retries"] = int(values["retries"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"grape-rewards: bad reward option: {exc} (timeout is seconds, retries an integer)") from None
    if values.get("timeout", 1.0) <= 0 or values.get("retries", 0) < 0:
        raise ValueError("grape-rewards: timeout must be > 0 and retries >= 0")
    if "index" in values:  # one canonical form: the folders, comma-separated (the settings are a cache key)
        where = "index" if overrides and overrides.get("index") not in (None, "") else f"index ({ENV_VARS['index']})"
        values["index"] = ",".join(parse_index_list(values["index"], f"grape-rewards: {where}"))
    for name in ("url", "token", "retriever", "reward_config", "device"):
        if name in values:
            values[name] = str(values[name])
    return AdapterSettings(**values)


# -- labels -> reward items --------------------------------------------------------------------------------
def sample_name(where: str, position: int, query_id: str | None = None) -> str:
    """How an error names a sample: ``where`` formatted with its position, and its query_id when known.

    >>> sample_name("labels[{}]", 3), sample_name("labels[{}]", 0, "q17")
    ('labels[3]', "labels[0] (query_id 'q17')")
    """
    name = where.format(position)
    return name if query_id is None else f"{name} (query_id {query_id!r})"


def item_fields(label: Any, completion: str, where: str = "label") -> dict[str, Any]:
    """The native reward item (as a dict, None fields left out) of a completion and its label.

    >>> item_fields('{"target_ids": ["c1"], "reference_id": "r"}', "<answer>a dog</answer>")
    {'completion': '<answer>a dog</answer>', 'target_ids': ['c1'], 'reference_id': 'r'}
    """
    from grape_rewards.labels import LabelError, parse_label

    if not isinstance(completion, str):
        raise ValueError(f"grape-rewards: the completion must be a string, got {type(completion).__name__}")
    try:
        parsed = parse_label(label)
    except LabelError as exc:
        raise ValueError(f"grape-rewards: {where}: {exc} (label {str(label)[:120]!r})") from None
    out: dict[str, Any] = {"completion": completion, "target_ids": list(parsed.target_ids)}
    if parsed.excluded_ids:
        out["excluded_ids"] = list(parsed.excluded_ids)
    for name in ("reference_id", "query_id", "original_query"):
        value = getattr(parsed, name)
        if value is not None:
            out[name] = value
    return out


def finite(value: Any) -> float:
    """A float, with NaN and infinities (never expected) turned into 0.0 so no framework chokes on them."""
    x = float(value)
    return x if math.isfinite(x) else 0.0


# -- the service ---------------------------------------------------------------------------------------------
_lock = threading.Lock()
_sync_clients: dict[AdapterSettings, RewardClient] = {}
_async_clients: dict[tuple[AdapterSettings, int], tuple[asyncio.AbstractEventLoop, AsyncRewardClient]] = {}


def sync_client(settings: AdapterSettings) -> RewardClient:
    """The process's (thread-safe) client of the service named by ``settings``."""
    from grape_rewards.client import RewardClient

    with _lock:
        client = _sync_clients.get(settings)
        if client is None:
            client = RewardClient(settings.url or "", token=settings.token, timeout=settings.timeout,
                                  retries=settings.retries)
            _sync_clients[settings] = client
        return client


def async_client(settings: AdapterSettings) -> AsyncRewardClient:
    """The async client of the service for the running event loop (httpx pools are bound to a loop)."""
    from grape_rewards.client import AsyncRewardClient

    loop = asyncio.get_running_loop()
    key = (settings, id(loop))
    with _lock:
        entry = _async_clients.get(key)
        if entry is None or entry[0] is not loop:
            for old_key, (old_loop, _) in list(_async_clients.items()):
                if old_loop.is_closed():
                    del _async_clients[old_key]
            client = AsyncRewardClient(settings.url or "", token=settings.token, timeout=settings.timeout,
                                       retries=settings.retries)
            _async_clients[key] = (loop, client)
            return client
        return entry[1]


def service_error(exc: Exception, settings: AdapterSettings) -> RuntimeError:
    """A clear error (logged at ERROR, since OpenRLHF logs swallowed reward errors only at INFO)."""
    status = getattr(exc, "status", None)
    if status is not None and 400 <= status < 500 and status != 429:
        message = (f"grape-rewards: the reward service refused the sample: {exc}. The request is malformed or names "
                   "ids the service's index lacks: check the training data's labels against the index.")
    else:
        message = (f"grape-rewards: no reward from the service at {settings.url}: {exc}. Is `grape-rewards serve` "
                   "running and ready (GET /ready)? The URL comes from GRAPE_REWARD_URL or the adapter's `url` option; "
                   "a longer outage needs more `retries` (GRAPE_REWARD_RETRIES).")
    logger.error(message)
    return RuntimeError(message)


# -- in-process scoring --------------------------------------------------------------------------------------
T = TypeVar("T")
R = TypeVar("R")


class _Job(Generic[T, R]):
    __slots__ = ("done", "error", "items", "results")

    def __init__(self, items: list[T]) -> None:
        self.items = items
        self.results: list[R] | None = None
        self.error: BaseException | None = None
        self.done = False


class ThreadBatcher(Generic[T, R]):
    """Score calls from many threads in shared batches (leader/follower; no thread of its own).

    A caller queues its items; if no batch is running it becomes the leader and runs everything queued
    (in chunks of at most ``max_batch_size`` items, whole calls only) until its own call is done, while the
    others wait. So the calls that arrive during a batch form the next one. If a batch raises, each of its
    calls is run alone, so one bad call cannot fail the others.

    >>> batcher = ThreadBatcher(lambda xs: [x * 2 for x in xs])
    >>> batcher.submit([1, 2, 3])
    [2, 4, 6]
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch_size: int = 256) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.batch_sizes: list[int] = []
        """Items per batch run (the last 1000), for tests and logs."""
        self._cond = threading.Condition()
        self._queue: list[_Job[T, R]] = []
        self._busy = False

    def submit(self, items: Sequence[T]) -> list[R]:
        job: _Job[T, R] = _Job(list(items))
        if not job.items:
            return []
        with self._cond:
            self._queue.append(job)
            while self._busy and not job.done:
                self._cond.wait()
            if job.done:
                return self._result(job)
            self._busy = True
        try:
            while not job.done:
                with self._cond:
                    batch: list[_Job[T, R]] = []
                    size = 0
                    while self._queue and (not batch or size + len(self._queue[0].items) <= self.max_batch_size):
                        batch.append(self._queue.pop(0))
                        size += len(batch[-1].items)
                self._run(batch)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return self._result(job)

    def _run(self, batch: list[_Job[T, R]]) -> None:
        flat = [item for job in batch for item in job.items]
        self.batch_sizes = [*self.batch_sizes[-999:], len(flat)]
        try:
            results = list(self.fn(flat))
            if len(results) != len(flat):
                raise RuntimeError(f"scored {len(flat)} items but got {len(results)} results")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:
                for job in batch:
                    self._run([job])
                return
        else:
            start = 0
            for job in batch:
                job.results = results[start:start + len(job.items)]
                start += len(job.items)
        with self._cond:
            for job in batch:
                job.done = True
            self._cond.notify_all()

    @staticmethod
    def _result(job: _Job[T, R]) -> list[R]:
        if job.error is not None:
            raise job.error
        assert job.results is not None
        return job.results


class InProcessScorer:
    """A :class:`~grape_rewards.scorer.RewardScorer` loaded from settings, behind a :class:`ThreadBatcher`."""

    def __init__(self, scorer: RewardScorer, max_batch_size: int = 256) -> None:
        self.scorer = scorer
        self.batcher: ThreadBatcher[RewardItem, dict[str, float]] = ThreadBatcher(scorer.score, max_batch_size)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.scorer.keys)

    def check(self, items: Sequence[RewardItem], where: str = "sample {}") -> None:
        """Raise a ValueError naming the first item the index cannot score (before it joins a batch).

        The item is named by ``where`` formatted with its position in this call, and by its label's
        ``query_id`` when it has one: OpenRLHF and verl call with one sample at a time, where the position is
        always 0 and only the query_id tells which sample of the dataset it was.
        """
        from grape_rewards.scorer import ItemError

        try:
            for i, item in enumerate(items):
                self.scorer.validate_item(item, sample_name(where, i, item.query_id))
        except ItemError as exc:
            raise ValueError(f"grape-rewards: {exc}") from None

    def score(self, items: Sequence[RewardItem], where: str = "sample {}") -> list[dict[str, float]]:
        """Check, then score ``items`` in a batch shared with the other threads; one dict per item."""
        self.check(items, where)
        return self.batcher.submit(items)

    def score_dicts(self, items: Sequence[Mapping[str, Any]], where: str = "sample {}") -> list[dict[str, float]]:
        """:meth:`score` of native item dicts (as :func:`item_fields` builds them)."""
        from grape_rewards.scorer import RewardItem

        return self.score([RewardItem(**dict(item)) for item in items], where)


def index_paths(index: str) -> list[str]:
    """The index folder(s) of the ``index`` setting (``GRAPE_INDEX``), in the syntax of every ``--index``
    (:func:`~grape_rewards.index_list.parse_index_list`): several make an ensemble.

    >>> index_paths("idx/a, idx/b")
    ['idx/a', 'idx/b']
    """
    return parse_index_list(index, f"grape-rewards: index ({ENV_VARS['index']})")


_scorers: dict[AdapterSettings, InProcessScorer] = {}
_scorer_lock = threading.Lock()


def in_process(settings: AdapterSettings) -> InProcessScorer:
    """The process's scorer for ``settings.index`` (loaded once, on first use; the fingerprint is checked)."""
    if not settings.index:
        raise RuntimeError(NO_BACKEND)
    key = AdapterSettings(index=settings.index, retriever=settings.retriever, reward_config=settings.reward_config,
                          device=settings.device)
    with _scorer_lock:
        scorer = _scorers.get(key)
        if scorer is None:
            from grape_rewards.ensemble import scorer_from_indexes
            from grape_rewards.rewards.config import RewardConfig

            logger.info("grape-rewards: loading %s (index %s) in-process on %s", settings.retriever or
                        "the index's retriever", settings.index, settings.device)
            paths = index_paths(settings.index)  # several: an ensemble; checked before anything is read
            config = RewardConfig.from_yaml(settings.reward_config) if settings.reward_config else RewardConfig()
            scorer = InProcessScorer(scorer_from_indexes(paths, config, retriever=settings.retriever,
                                                         device=settings.device))
            _scorers[key] = scorer
        return scorer


def require_backend(settings: AdapterSettings) -> None:
    """Raise the clear :data:`NO_BACKEND` error when neither a URL nor an index is configured."""
    if settings.mode == "none":
        logger.error(NO_BACKEND)
        raise RuntimeError(NO_BACKEND)
