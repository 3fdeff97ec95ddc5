"""Clients of the reward service (``grape-rewards serve``), sync and async, on httpx.

    from grape_rewards.client import RewardClient
    with RewardClient(["http://gpu-a:8000", "http://gpu-b:8000"], token=os.environ["GRAPE_TOKEN"]) as client:
        results = client.score([{"rewrite": "a brown dog catching a frisbee", "target_ids": ["img_1"]}])
        results[0]["reward"], results[0]["rank"]

Requests go round-robin over the URLs. Connection errors, timeouts, 429, 500, 502, 503 and 504 are retried with
exponential backoff and jitter (a Retry-After is honoured), moving to the next URL each time; any other 4xx is
raised at once as :class:`RewardServiceError` with the server's message (retrying a bad request cannot help).
Scoring is a pure function of the request, so a retry after a lost answer cannot duplicate or reorder anything:
each call returns exactly one result per item, in order.

The default budget (:data:`DEFAULT_RETRIES` retries, 0.5 s doubling to at most 10 s) waits 22.75-45.5 s in all,
longer than a restart of the service (its model and index load before it answers again). Each client holds at
most ``max_connections`` requests in flight; further calls wait for a slot in the client, not in httpx's
connection pool (whose bookkeeping grows with the square of the requests waiting in it).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses worth retrying: overload (429, 503 queue full or draining), a Ray Serve replica that died under its
requests (500 from Serve's proxy) and proxies losing the backend (502, 504)."""

DEFAULT_RETRIES = 8
"""Extra attempts after the first: with the default backoff, 22.75-45.5 s of waiting, which outlasts a restart."""

DEFAULT_MAX_CONNECTIONS = 256
"""Requests one client holds in flight (and HTTP connections it keeps): more wait in the client, in order."""


class RewardServiceError(RuntimeError):
    """The service refused a request (status and message), or every retry failed (status None)."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.url = url


def _base_url(url: str) -> str:
    """A service's base URL; an OpenRLHF-style endpoint URL (``.../get_reward``) is accepted too.

    >>> _base_url("http://h:8000/get_reward"), _base_url("http://h:8000/")
    ('http://h:8000', 'http://h:8000')
    """
    url = url.strip().rstrip("/")
    for suffix in ("/get_reward", "/v1/rewards", "/retrieve"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def _item_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    if hasattr(item, "model_dump"):
        return {k: v for k, v in item.model_dump().items() if v is not None}
    raise TypeError(f"a reward item must be a mapping or a RewardItem, got {type(item).__name__}")


def backoff_caps(retries: int, backoff: float, max_backoff: float) -> list[float]:
    """The longest wait before each retry (``backoff`` doubling, capped); each actual wait is in [cap / 2, cap].

    >>> backoff_caps(DEFAULT_RETRIES, 0.5, 10.0)
    [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    """
    return [min(max_backoff, backoff * 2 ** attempt) for attempt in range(retries)]


@dataclass(frozen=True)
class Call:
    """One service call: method, path, JSON body and what to take from the answer."""

    method: str
    path: str
    body: Any = None
    unpack: Callable[[Any], Any] = lambda answer: answer


def score_call(items: Sequence[Any]) -> Call:
    return Call("POST", "/v1/rewards", {"items": [_item_dict(i) for i in items]}, lambda answer: answer["results"])


def get_reward_call(queries: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[Any]) -> Call:
    body: dict[str, Any] = {"query": list(queries), "labels": list(labels)}
    if prompts is not None:
        body["prompts"] = list(prompts)
    return Call("POST", "/get_reward", body)


def retrieve_call(queries: Sequence[str], topk: int, return_scores: bool) -> Call:
    body = {"queries": list(queries), "topk": topk, "return_scores": return_scores}
    return Call("POST", "/retrieve", body, lambda answer: answer["result"])


class _Policy:
    """URLs, auth, pool limits and the retry policy: everything the sync and async clients share but the I/O."""

    def __init__(self, urls: str | Sequence[str], token: str | None, timeout: float, retries: int | None,
                 backoff: float, max_backoff: float, max_connections: int) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("give at least one service URL, e.g. http://127.0.0.1:8000")
        retries = DEFAULT_RETRIES if retries is None else retries
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0")
        if timeout <= 0 or max_connections < 1:
            raise ValueError("timeout must be > 0 and max_connections >= 1")
        self.urls = [_base_url(u) for u in urls]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_connections = max_connections
        self.timeout = httpx.Timeout(timeout)
        """Connect, write, read and pool waits, each; a call never waits for the pool (see ``max_connections``)."""
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._cycle = itertools.cycle(range(len(self.urls)))
        self._lock = threading.Lock()

    def next_url(self) -> str:
        with self._lock:
            return self.urls[next(self._cycle)]

    def attempts(self, call: Call) -> Iterator[Attempt]:
        """The tries of one call, the URL moving round-robin; the last one's ``judge`` returns or raises."""
        started = time.monotonic()
        for number in range(self.retries + 1):
            yield Attempt(self, call, self.next_url(), number, started)

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds before retry ``attempt`` (0-based): Retry-After when given, else exponential with jitter."""
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff) + random.uniform(0, self.backoff)
            except ValueError:
                pass
        cap = backoff_caps(attempt + 1, self.backoff, self.max_backoff)[attempt]
        return random.uniform(cap / 2, cap)  # "equal jitter": spread retries, keep a floor


@dataclass(frozen=True)
class Attempt:
    """One try of a call: where it goes, and what its outcome means (the retry policy, free of I/O)."""

    policy: _Policy
    call: Call
    url: str
    number: int
    started: float

    def judge(self, outcome: httpx.Response | httpx.TransportError) -> tuple[bool, Any]:
        """``(True, result)`` on success; ``(False, seconds to wait)`` before a retry; raises when none helps."""
        where = self.url + self.call.path
        retry_after = None
        if isinstance(outcome, httpx.TransportError):
            error = RewardServiceError(f"{where}: {type(outcome).__name__}: {outcome}", None, self.url)
        elif outcome.status_code < 400:
            return True, self.call.unpack(outcome.json())
        else:
            error = _answer_error(outcome, where, self.url)
            if outcome.status_code not in RETRY_STATUSES:
                raise error
            retry_after = outcome.headers.get("retry-after")
        retries = self.policy.retries
        if self.number >= retries:
            raise RewardServiceError(f"gave up after {retries + 1} attempts in {time.monotonic() - self.started:.1f} "
                                     f"s: {error}", error.status, self.url)
        return False, self.policy.delay(self.number, retry_after)


def _send(http: httpx.Client, call: Call, url: str) -> httpx.Response | httpx.TransportError:
    try:
        return http.request(call.method, url + call.path, json=call.body)
    except httpx.TransportError as exc:
        return exc


async def _send_async(http: httpx.AsyncClient, call: Call, url: str) -> httpx.Response | httpx.TransportError:
    try:
        return await http.request(call.method, url + call.path, json=call.body)
    except httpx.TransportError as exc:
        return exc


def _answer_error(response: httpx.Response, where: str, url: str) -> RewardServiceError:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return RewardServiceError(f"{where} answered {response.status_code}: {detail}", response.status_code, url)


class RewardClient:
    """A synchronous, thread-safe client of one or more reward services.

    Args:
        urls: base URLs (``http://host:8000``), a list or a comma-separated string; used round-robin.
        token: the bearer token (``GRAPE_TOKEN`` of the server).
        timeout: seconds per HTTP attempt (each of connect, send and read).
        retries: extra attempts after the first on retryable failures (None: :data:`DEFAULT_RETRIES`).
        backoff: base delay in seconds (doubled each retry, jittered, capped at ``max_backoff``).
        max_connections: requests in flight at once (other threads wait their turn in the client).
        transport: an httpx transport (tests inject ``httpx.MockTransport``).
    """

    def __init__(self, urls: str | Sequence[str], token: str | None = None, timeout: float = 60.0,
                 retries: int | None = None, backoff: float = 0.5, max_backoff: float = 10.0,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, transport: httpx.BaseTransport | None = None) -> None:
        self._policy = _Policy(urls, token, timeout, retries, backoff, max_backoff, max_connections)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._http = httpx.Client(timeout=self._policy.timeout, limits=self._policy.limits,
                                  headers=self._policy.headers, transport=transport)

    @property
    def urls(self) -> list[str]:
        return list(self._policy.urls)

    def call(self, call: Call) -> Any:
        """One call with retries; what ``call.unpack`` takes from the decoded JSON answer."""
        with self._slots:
            for attempt in self._policy.attempts(call):
                done, value = attempt.judge(_send(self._http, call, attempt.url))
                if done:
                    return value
                time.sleep(value)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """One call with retries; the decoded JSON answer."""
        return self.call(Call(method, path, json))

    def score(self, items: Sequence[Any]) -> list[dict[str, float]]:
        """Reward and every statistic of each item (dicts or :class:`~grape_rewards.scorer.RewardItem`)."""
        return self.call(score_call(items)) if items else []

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                   labels: Sequence[Any] = ()) -> dict[str, Any]:
        """OpenRLHF's call: ``{"rewards", "scores", "extra_logs"}`` for templated queries and their labels."""
        return self.call(get_reward_call(queries, prompts, labels))

    def retrieve(self, queries: Sequence[str], topk: int = 10, return_scores: bool = True) -> list[list[Any]]:
        """Top-k documents of each query, best first: ``{"document": {"id", "contents"}, "score"}`` (the documents
        alone without ``return_scores``); contents is the item's text, or its id where the index keeps no texts."""
        return self.call(retrieve_call(queries, topk, return_scores))

    def info(self) -> dict[str, Any]:
        return self.request("GET", "/info")

    def ready(self) -> bool:
        """Whether the next service in turn is ready (no retries)."""
        try:
            return self._http.get(self._policy.next_url() + "/ready").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRewardClient:
    """The asyncio twin of :class:`RewardClient` (same arguments, ``await`` every call).

    Any number of concurrent calls is fine: at most ``max_connections`` are on the wire at once, the others wait
    their turn (first come, first served) in the client. Use one client per event loop.
    """

    def __init__(self, urls: str | Sequence[str], token: str | None = None, timeout: float = 60.0,
                 retries: int | None = None, backoff: float = 0.5, max_backoff: float = 10.0,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._policy = _Policy(urls, token, timeout, retries, backoff, max_backoff, max_connections)
        self._slots = asyncio.BoundedSemaphore(max_connections)
        self._http = httpx.AsyncClient(timeout=self._policy.timeout, limits=self._policy.limits,
                                       headers=self._policy.headers, transport=transport)

    @property
    def urls(self) -> list[str]:
        return list(self._policy.urls)

    async def call(self, call: Call) -> Any:
        """One call with retries; what ``call.unpack`` takes from the decoded JSON answer."""
        async with self._slots:
            for attempt in self._policy.attempts(call):
                done, value = attempt.judge(await _send_async(self._http, call, attempt.url))
                if done:
                    return value
                await asyncio.sleep(value)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        return await self.call(Call(method, path, json))

    async def score(self, items: Sequence[Any]) -> list[dict[str, float]]:
        return await self.call(score_call(items)) if items else []

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                         labels: Sequence[Any] = ()) -> dict[str, Any]:
        return await self.call(get_reward_call(queries, prompts, labels))

    async def retrieve(self, queries: Sequence[str], topk: int = 10, return_scores: bool = True) -> list[list[Any]]:
        return await self.call(retrieve_call(queries, topk, return_scores))

    async def info(self) -> dict[str, Any]:
        return await self.request("GET", "/info")

    async def ready(self) -> bool:
        try:
            return (await self._http.get(self._policy.next_url() + "/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
