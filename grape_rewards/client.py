"""Clients of the reward service (``grape-rewards serve``), sync and async, on httpx.

    from grape_rewards.client import RewardClient
    with RewardClient(["http://gpu-a:8000", "http://gpu-b:8000"], token=os.environ["GRAPE_TOKEN"]) as client:
        results = client.score([{"rewrite": "a brown dog catching a frisbee", "target_ids": ["img_1"]}])
        results[0]["reward"], results[0]["rank"]

Requests go round-robin over the URLs. Connection errors, timeouts, 429, 502, 503 and 504 are retried
with exponential backoff and jitter (a 503's Retry-After is honoured), moving to the next URL each time;
any other 4xx is raised at once as :class:`RewardServiceError` with the server's message (retrying a bad
request cannot help). Scoring is a pure function of the request, so a retry after a lost answer cannot
duplicate or reorder anything: each call returns exactly one result per item, in order.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 502, 503, 504})
"""Statuses worth retrying: overload (429, 503 queue full or draining) and proxies losing the backend."""


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


class _Policy:
    """URLs, auth and the retry schedule shared by the sync and async clients."""

    def __init__(self, urls: str | Sequence[str], token: str | None, retries: int, backoff: float,
                 max_backoff: float) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("give at least one service URL, e.g. http://127.0.0.1:8000")
        if retries < 0 or backoff < 0:
            raise ValueError("retries and backoff must be >= 0")
        self.urls = [_base_url(u) for u in urls]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._cycle = itertools.cycle(range(len(self.urls)))
        self._lock = threading.Lock()

    def next_url(self) -> str:
        with self._lock:
            return self.urls[next(self._cycle)]

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds before retry ``attempt`` (0-based): Retry-After when given, else exponential with jitter."""
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff) + random.uniform(0, self.backoff)
            except ValueError:
                pass
        cap = min(self.max_backoff, self.backoff * (2 ** attempt))
        return random.uniform(cap / 2, cap)  # "equal jitter": spread retries, keep a floor

    @staticmethod
    def error(response: httpx.Response, url: str) -> RewardServiceError:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        return RewardServiceError(f"{url} answered {response.status_code}: {detail}", response.status_code, url)


class RewardClient:
    """A synchronous, thread-safe client of one or more reward services.

    Args:
        urls: base URLs (``http://host:8000``), a list or a comma-separated string; used round-robin.
        token: the bearer token (``GRAPE_TOKEN`` of the server).
        timeout: seconds per HTTP attempt (connect and read).
        retries: extra attempts after the first on retryable failures.
        backoff: base delay in seconds (doubled each retry, jittered, capped at ``max_backoff``).
        transport: an httpx transport (tests inject ``httpx.MockTransport``).
    """

    def __init__(self, urls: str | Sequence[str], token: str | None = None, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 0.5, max_backoff: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._policy = _Policy(urls, token, retries, backoff, max_backoff)
        self._http = httpx.Client(timeout=timeout, headers=self._policy.headers, transport=transport)

    @property
    def urls(self) -> list[str]:
        return list(self._policy.urls)

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """One call with retries; the decoded JSON answer."""
        policy = self._policy
        last: Exception | None = None
        for attempt in range(policy.retries + 1):
            url = policy.next_url()
            retry_after = None
            try:
                response = self._http.request(method, url + path, json=json)
            except httpx.TransportError as exc:
                last = RewardServiceError(f"{url}{path}: {type(exc).__name__}: {exc}", None, url)
            else:
                if response.status_code < 400:
                    return response.json()
                last = policy.error(response, url + path)
                if response.status_code not in RETRY_STATUSES:
                    raise last
                retry_after = response.headers.get("retry-after")
            if attempt < policy.retries:
                time.sleep(policy.delay(attempt, retry_after))
        raise RewardServiceError(f"gave up after {policy.retries + 1} attempts: {last}",
                                 getattr(last, "status", None))

    def score(self, items: Sequence[Any]) -> list[dict[str, float]]:
        """Reward and every statistic of each item (dicts or :class:`~grape_rewards.scorer.RewardItem`)."""
        if not items:
            return []
        return self.request("POST", "/v1/rewards", {"items": [_item_dict(i) for i in items]})["results"]

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                   labels: Sequence[Any] = ()) -> dict[str, Any]:
        """OpenRLHF's call: ``{"rewards", "scores", "extra_logs"}`` for templated queries and their labels."""
        payload: dict[str, Any] = {"query": list(queries), "labels": list(labels)}
        if prompts is not None:
            payload["prompts"] = list(prompts)
        return self.request("POST", "/get_reward", payload)

    def retrieve(self, queries: Sequence[str], topk: int = 10, return_scores: bool = True) -> list[list[Any]]:
        """Top-k corpus ids (and scores) of each query."""
        body = {"queries": list(queries), "topk": topk, "return_scores": return_scores}
        return self.request("POST", "/retrieve", body)["result"]

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
    """The asyncio twin of :class:`RewardClient` (same arguments, ``await`` every call)."""

    def __init__(self, urls: str | Sequence[str], token: str | None = None, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 0.5, max_backoff: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 256) -> None:
        self._policy = _Policy(urls, token, retries, backoff, max_backoff)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(timeout=timeout, headers=self._policy.headers, transport=transport,
                                       limits=limits)

    @property
    def urls(self) -> list[str]:
        return list(self._policy.urls)

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        policy = self._policy
        last: Exception | None = None
        for attempt in range(policy.retries + 1):
            url = policy.next_url()
            retry_after = None
            try:
                response = await self._http.request(method, url + path, json=json)
            except httpx.TransportError as exc:
                last = RewardServiceError(f"{url}{path}: {type(exc).__name__}: {exc}", None, url)
            else:
                if response.status_code < 400:
                    return response.json()
                last = policy.error(response, url + path)
                if response.status_code not in RETRY_STATUSES:
                    raise last
                retry_after = response.headers.get("retry-after")
            if attempt < policy.retries:
                await asyncio.sleep(policy.delay(attempt, retry_after))
        raise RewardServiceError(f"gave up after {policy.retries + 1} attempts: {last}",
                                 getattr(last, "status", None))

    async def score(self, items: Sequence[Any]) -> list[dict[str, float]]:
        if not items:
            return []
        return (await self.request("POST", "/v1/rewards", {"items": [_item_dict(i) for i in items]}))["results"]

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                         labels: Sequence[Any] = ()) -> dict[str, Any]:
        payload: dict[str, Any] = {"query": list(queries), "labels": list(labels)}
        if prompts is not None:
            payload["prompts"] = list(prompts)
        return await self.request("POST", "/get_reward", payload)

    async def retrieve(self, queries: Sequence[str], topk: int = 10, return_scores: bool = True) -> list[list[Any]]:
        body = {"queries": list(queries), "topk": topk, "return_scores": return_scores}
        return (await self.request("POST", "/retrieve", body))["result"]

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
