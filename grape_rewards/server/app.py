"""The FastAPI app of the reward service: endpoints, auth, limits, readiness and drain.

``create_app(scorer, config)`` wraps a loaded :class:`~grape_rewards.scorer.RewardScorer` (what Ray Serve or a
test mounts); ``create_app_from_config(config)`` loads the retriever and index in its lifespan, checks the
fingerprint, and only then reports ready.

Endpoints: ``POST /get_reward`` (OpenRLHF), ``POST /v1/rewards`` (native), ``POST /retrieve`` (Search-R1 top-k),
``GET /health`` (alive), ``GET /ready`` (accepting work), ``GET /info``, ``GET /metrics`` (Prometheus), and the
contract: ``GET /openapi.json`` (:mod:`.schema`; no /docs page, whose scripts would come from a CDN).
Errors are JSON ``{"detail": message}`` with a 4xx status that names the problem; 503s carry Retry-After; a 500
says only that the error was logged (with an id to find it), never the exception's text.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response

from .._version import __version__
from ..ensemble import EnsembleScorer, scorer_from_indexes
from ..framework_io import native_answer, openrlhf_answer
from ..scorer import ItemError, ItemRows, RewardItem, RewardScorer
from .batcher import BatcherClosed, MicroBatcher, QueueFull, SearchQuery
from .config import ServeConfig
from .metrics import CONTENT_TYPE, ENDPOINTS, ServiceMetrics
from .protocol import (
    RequestError,
    dumps,
    parse_body,
    parse_native,
    parse_openrlhf,
    parse_retrieve,
    retrieve_response,
)
from .rejections import RejectionLog
from .schema import (
    Health,
    Info,
    OpenRLHFRequest,
    OpenRLHFResponse,
    Readiness,
    RetrieveRequest,
    RetrieveResponse,
    RewardsRequest,
    RewardsResponse,
    build_openapi,
    error_responses,
    metrics_response,
    request_body,
)

logger = logging.getLogger("grape_rewards.server")
OPEN_PATHS = frozenset({"/health", "/ready", "/openapi.json"})
"""Answered without the token (liveness and readiness probes, and the API contract)."""

T = TypeVar("T")
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class HTTPProblem(Exception):
    """An error answered as ``{"detail": message}`` with ``status`` (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=dumps(obj), status_code=status, media_type="application/json", headers=headers)


class ServiceState:
    """What the endpoints share: the config, the scorer, the batcher, the metrics and the readiness flag."""

    def __init__(self, config: ServeConfig, scorer: RewardScorer | None = None) -> None:
        self.config = config
        self.scorer = scorer
        self.metrics = ServiceMetrics()
        self.rejections = RejectionLog(logger)
        """Each 4xx's reason at WARNING, rate-limited (a client such as OpenRLHF's may never read the body)."""
        self.batcher: MicroBatcher | None = None
        self.ready = False
        self.not_ready_reason = "starting: the index is not loaded yet"
        self.started_at = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def startup(self) -> None:
        """Load (when needed), start the device worker, warm it up, then report ready."""
        if self.scorer is None:
            self.not_ready_reason = "starting: loading the retriever and the index"
            self.scorer = await asyncio.to_thread(load_scorer, self.config)
        scorer = self.scorer
        self._loop = asyncio.get_running_loop()
        self.batcher = MicroBatcher(scorer, max_batch_size=self.config.max_batch_size,
                                    max_wait_ms=self.config.max_wait_ms, max_queue=self.config.max_queue,
                                    metrics=self.metrics, retry_after=self.config.retry_after_s)
        self.batcher.start()
        if self.config.num_threads is not None:
            await self.batcher.run_on_device(torch.set_num_threads, self.config.num_threads)
        await self.batcher.run_on_device(warm_up, scorer)
        if self.config.gc_tuning:
            tune_gc()
        self.metrics.attach(scorer, {
            "version": __version__, "retriever": scorer.retriever.spec, "fingerprint": scorer.retriever.fingerprint,
            "index": scorer.index.name, "corpus_size": str(len(scorer.index)), "device": str(scorer.index.device)})
        self.ready = True
        self.metrics.ready.set(1)
        logger.info("ready: %s over %s (%d items) on %s", scorer.retriever.spec, scorer.index.name,
                    len(scorer.index), scorer.index.device)

    def begin_drain(self) -> None:
        """Report not ready (first thing on SIGTERM); requests already accepted are still answered."""
        if self.ready:
            logger.info("draining: /ready is now false; answering the requests already accepted")
        self.ready = False
        self.not_ready_reason = "draining: the service is shutting down"
        self.metrics.ready.set(0)

    def drain_on_signal(self) -> None:
        """SIGTERM's first step (called from the signal handler, on the event loop's thread): report not ready
        and start closing the batcher at once, so that what is still unscored after ``drain_timeout_s`` is
        answered 503 with Retry-After (retried elsewhere by the clients) before the server stops."""
        self.begin_drain()
        if self.batcher is not None and self._loop is not None and self._draining is None:
            self._draining = self._loop.create_task(self.batcher.close(timeout=self.config.drain_timeout_s))

    async def shutdown(self) -> None:
        self.begin_drain()
        if self._draining is not None:
            await self._draining
        elif self.batcher is not None:
            await self.batcher.close(timeout=self.config.drain_timeout_s)
        logger.info("stopped")

    # -- request helpers ------------------------------------------------------------------------------
    def require_ready(self) -> RewardScorer:
        if self.scorer is None or self.batcher is None or (not self.ready and not self.batcher.running):
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise HTTPProblem(503, f"not ready ({self.not_ready_reason})",
                              {"Retry-After": str(self.config.retry_after_s)})
        return self.scorer

    async def get_reward(self, body: bytes) -> bytes:
        """``POST /get_reward`` (OpenRLHF) from body to answer; raises RequestError / HTTPProblem."""
        scorer = self.require_ready()
        config = self.config
        items = parse_openrlhf(parse_body(body), config.max_items_per_request)
        samples = await self.score(items, validated(scorer, items, "labels[{}]", "query[{}]"))
        return dumps(openrlhf_answer(samples, scorer.config))

    async def rewards(self, body: bytes) -> bytes:
        """``POST /v1/rewards`` (native) from body to answer; raises RequestError / HTTPProblem."""
        scorer = self.require_ready()
        config = self.config
        items = parse_native(parse_body(body), config.max_items_per_request)
        samples = await self.score(items, validated(scorer, items, "items[{}]"))
        return dumps(native_answer(samples, scorer.keys))

    async def retrieve(self, body: bytes) -> bytes:
        """``POST /retrieve`` (Search-R1 top-k) from body to answer, through the batcher like scoring."""
        scorer = self.require_ready()
        config = self.config
        queries, topk, return_scores, refs = parse_retrieve(parse_body(body), config.max_items_per_request,
                                                            config.max_topk, config.max_text_chars)
        if scorer.retriever.takes_reference and refs is None and getattr(scorer.retriever, "fusion", "sum") != "text":
            raise RequestError(422, f"{scorer.retriever.spec!r} fuses a reference image into each query: pass "
                                    "'reference_ids' (one corpus id per query)")
        if refs is not None:
            try:
                scorer.index.rows(refs)
            except KeyError as exc:
                raise RequestError(422, f"reference_ids: {exc}") from None
        found = await self._admitted(self.batcher.submit_retrieve(  # type: ignore[union-attr]
            [SearchQuery(q, refs[i] if refs is not None else None) for i, q in enumerate(queries)], topk,
            config.search_backend))
        ids = [f[1] for f in found]
        index, contents = scorer.index, ids  # no texts kept (image corpora, older indexes): the ids stand in
        kind = index.contents_kind
        if kind == "text":  # off the event loop, one lookup for every query's documents (one call per shard)
            texts = iter(await asyncio.to_thread(index.contents, [i for row in ids for i in row]))
            contents = [[next(texts) for _ in row] for row in ids]
        return dumps(retrieve_response([f[0] for f in found], ids, contents, kind, return_scores))

    async def score(self, items: list[RewardItem], rows: ItemRows) -> list[dict[str, float]]:
        assert self.batcher is not None
        return await self._admitted(self.batcher.submit(items, rows))

    async def _admitted(self, work: Awaitable[T]) -> T:
        """Await queued work, answering a full queue or a draining service with 503 and Retry-After."""
        try:
            return await work
        except QueueFull as exc:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise HTTPProblem(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except BatcherClosed as exc:
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise HTTPProblem(503, str(exc), {"Retry-After": str(self.config.retry_after_s)}) from None
        except (KeyError, ValueError) as exc:  # validated before enqueueing; kept as a safety net
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise HTTPProblem(422, str(message)) from None


def validated(scorer: RewardScorer, items: list[RewardItem], where: str,
              completion_where: str | None = None) -> ItemRows:
    """:meth:`RewardScorer.validate`, its refusal answered 422."""
    try:
        return scorer.validate(items, where, completion_where)
    except ItemError as exc:
        raise RequestError(422, str(exc)) from None


def load_scorer(config: ServeConfig) -> RewardScorer:
    """The scorer the config names (:meth:`RewardScorer.from_index`: a fingerprint mismatch is refused), an
    :class:`~grape_rewards.ensemble.EnsembleScorer` when it names several indexes (a retriever beside several is
    refused by :func:`~grape_rewards.ensemble.scorer_from_indexes`, a ValueError, before anything is loaded)."""
    return scorer_from_indexes(
        config.index_paths, config.load_reward_config(), retriever=config.retriever or None, device=config.device,
        fusion=config.fusion, image_weight=config.image_weight,
        scorer_options={"cache_size": config.cache_size, "cache_bytes": config.cache_bytes,
                        "max_text_chars": config.max_text_chars})


def warm_up(scorer: RewardScorer) -> None:
    """One encode and one rank, so the first request does not pay for lazy initialisation (caches untouched)."""
    with torch.inference_mode():
        emb = scorer.retriever.encode_texts(["warm up"]).to(scorer.index.device)
        scorer.index.rank(emb, [[scorer.index.ids[0]]])
        scorer.retriever.text_info(["warm up"])


def tune_gc(young_threshold: int = 100_000) -> None:
    """Tune the garbage collector for a long-lived service whose big objects are all loaded at startup.

    ``gc.freeze()`` moves everything alive now (the model, the index, the tokenizer's tables) to a generation the
    collector never scans again, and the young generation is collected every ``young_threshold`` allocations
    instead of 700. A scored request allocates a few hundred container objects, and with the default thresholds
    the collections they trigger (full ones walking every loaded object) were the largest per-request cost of the
    service (measured: docs/shortcuts.md). Cycles created later are still collected.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, young_threshold), middle, old)


# -- ASGI guard: auth, body size, request metrics ---------------------------------------------------------
class _BodyTooLarge(RequestError):
    """Raised while the body is read (a chunked body announces no length): answered 413 wherever it is caught."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(413, _too_large(size, limit))


def bearer_token(header: bytes) -> bytes | None:
    """The credentials of an ``Authorization: Bearer <token>`` header; the scheme is case-insensitive (RFC 9110).

    >>> bearer_token(b"bearer abc"), bearer_token(b"BEARER   abc "), bearer_token(b"Basic abc")
    (b'abc', b'abc', None)
    """
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return credentials.strip()


def internal_error(where: str) -> str:
    """Log the exception being handled under a fresh id; the message for the client names only the id."""
    error_id = uuid.uuid4().hex[:12]
    logger.exception("unhandled error %s on %s", error_id, where)
    return f"internal error {error_id}: the service logged it"


class GuardMiddleware:
    """Pure ASGI middleware (cheap on the hot path): bearer-token auth, body-size limit, request metrics.

    :class:`RewardApp` puts it in front of FastAPI's own middleware stack, so the two scoring routes are answered
    here without passing through it (that stack costs more CPU than the rest of a single-sample request).
    """

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state
        token = state.config.token
        self.expected = token.encode() if token else None
        self.limit = state.config.max_body_bytes
        self.body_timeout = state.config.body_timeout_s
        self.fast: dict[str, Callable[[bytes], Awaitable[bytes]]] = {
            "/get_reward": state.get_reward, "/v1/rewards": state.rewards, "/retrieve": state.retrieve,
        } if state.config.fast_routes else {}
        """The POST routes, served here without the framework's routing and request objects (``fast_routes``;
        what it buys: docs/shortcuts.md), which on a small machine leaves more CPU to the device worker."""

    async def _reject(self, send: Callable[[dict], Awaitable[None]], path: str, status: int, message: str,
                      headers: dict[str, str] | None = None) -> None:
        """Answer ``status`` with ``{"detail": message}``; a 4xx's reason is also logged (rate-limited)."""
        if 400 <= status < 500:
            self.state.rejections.note(path, status, message)
        await _send_problem(send, status, message, headers)

    async def _serve_fast(self, handler: Callable[[bytes], Awaitable[bytes]], path: str,
                          receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            body = await handler(b"".join(chunks))
        except RequestError as exc:
            self.state.metrics.rejected.labels(reason="too_large" if exc.status == 413 else "bad_request").inc()
            await self._reject(send, path, exc.status, exc.message)
            return
        except HTTPProblem as exc:
            await self._reject(send, path, exc.status, exc.message, exc.headers)
            return
        except Exception:
            await _send_problem(send, 500, internal_error("a POST route"))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        metrics = self.state.metrics
        start = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        metrics.requests_in_progress += 1
        try:
            headers = dict(scope["headers"])
            if self.expected is not None and path not in OPEN_PATHS:
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(bearer_token(given) or b"", self.expected):
                    metrics.rejected.labels(reason="unauthorized").inc()
                    message = ("missing bearer token: send 'Authorization: Bearer <token>'" if not given
                               else "invalid bearer token")
                    await self._reject(send_wrapper, path, 401, message, {"WWW-Authenticate": "Bearer"})
                    return
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    declared = int(length)
                except ValueError:
                    await self._reject(send_wrapper, path, 400, "invalid Content-Length header")
                    return
                if declared > self.limit:
                    metrics.rejected.labels(reason="too_large").inc()
                    await self._reject(send_wrapper, path, 413, _too_large(declared, self.limit))
                    return
            received = 0
            body_done = False

            async def receive_limited() -> dict:
                nonlocal received, body_done
                if body_done:  # after the body: only a disconnect can come, and it may come at any time
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:
                    metrics.rejected.labels(reason="bad_request").inc()
                    raise RequestError(408, f"request body not received within body_timeout_s="
                                            f"{self.body_timeout:g} s") from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise _BodyTooLarge(received, self.limit)
                    body_done = not message.get("more_body", False)
                return message

            try:
                handler = self.fast.get(path) if scope["method"] == "POST" else None
                if handler is not None:
                    await self._serve_fast(handler, path, receive_limited, send_wrapper)
                else:
                    await self.app(scope, receive_limited, send_wrapper)
            except RequestError as exc:  # the body was too large or too slow (raised while it was read)
                if exc.status == 413:
                    metrics.rejected.labels(reason="too_large").inc()
                if not started:
                    await self._reject(send_wrapper, path, exc.status, exc.message,
                                       {"Connection": "close"} if exc.status == 408 else None)
        finally:
            metrics.requests_in_progress -= 1
            metrics.observe_request(endpoint, status, time.perf_counter() - start)


def _too_large(size: int, limit: int) -> str:
    return f"request body too large: {size} bytes > max_body_bytes={limit}; split the request"


async def _send_problem(send: Callable[[dict], Awaitable[None]], status: int, message: str,
                        headers: dict[str, str] | None = None) -> None:
    body = dumps({"detail": message})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# -- the app -------------------------------------------------------------------------------------------------
class RewardApp(FastAPI):
    """The service's FastAPI app, entered through its :class:`GuardMiddleware`: auth, limits and request metrics
    for every request, and ``/get_reward`` and ``/v1/rewards`` answered there; everything else (and lifespan)
    goes on to FastAPI."""

    guard: GuardMiddleware | None = None

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if self.guard is None:
            await super().__call__(scope, receive, send)
        else:
            await self.guard(scope, receive, send)


def create_app(scorer: RewardScorer | None, config: ServeConfig | None = None) -> FastAPI:
    """The service around a loaded scorer (``None``: load it from ``config`` at startup).

    The batcher starts in the app's lifespan; /ready is true once it runs and the worker is warm, and turns
    false when shutdown begins (call ``app.state.service.begin_drain()`` to flip it earlier, e.g. on SIGTERM).
    """
    if config is None:
        if scorer is None:
            raise ValueError("create_app needs a scorer or a config to load one from")
        config = ServeConfig(index=str(scorer.index.path or "<in-memory index>"))
    state = ServiceState(config, scorer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    # No /docs page: FastAPI's loads its scripts from a CDN, a blank page on an air-gapped cluster; /openapi.json is
    # the contract (any OpenAPI viewer or client generator reads it).
    app = RewardApp(title="grape-rewards", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                    description="Corpus-relative rank rewards for GRPO training of query-rewriting LLMs.")
    app.state.service = state
    app.openapi = functools.partial(build_openapi, app, OPEN_PATHS)  # type: ignore[method-assign]

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> Response:
        if 400 <= exc.status < 500:
            state.rejections.note(request.url.path, exc.status, exc.message)
        return json_response({"detail": exc.message}, exc.status, exc.headers)

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError) -> Response:
        state.metrics.rejected.labels(reason="too_large" if exc.status == 413 else "bad_request").inc()
        state.rejections.note(request.url.path, exc.status, exc.message)
        return json_response({"detail": exc.message}, exc.status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        return json_response({"detail": internal_error(request.url.path)}, 500)

    # The POST routes are served by GuardMiddleware's raw-ASGI fast path (the same code: the state's get_reward,
    # rewards, retrieve); these FastAPI routes publish their contract and answer what the fast path leaves.
    errors = error_responses(400, 401, 408, 413, 422, 500, 503)

    @app.post("/get_reward", openapi_extra=request_body(OpenRLHFRequest),
              responses={200: {"model": OpenRLHFResponse}, **errors})
    async def get_reward(request: Request) -> Response:
        """OpenRLHF's remote reward protocol."""
        return Response(await state.get_reward(await request.body()), media_type="application/json")

    @app.post("/v1/rewards", openapi_extra=request_body(RewardsRequest),
              responses={200: {"model": RewardsResponse}, **errors})
    async def rewards(request: Request) -> Response:
        """The native API: reward items in, every component and the statistics out."""
        return Response(await state.rewards(await request.body()), media_type="application/json")

    @app.post("/retrieve", openapi_extra=request_body(RetrieveRequest),
              responses={200: {"model": RetrieveResponse}, **errors})
    async def retrieve(request: Request) -> Response:
        """Top-k search in the Search-R1 shape, batched and admitted like scoring."""
        return Response(await state.retrieve(await request.body()), media_type="application/json")

    @app.get("/health", responses={200: {"model": Health}})
    async def health() -> Response:
        """Alive (the process answers), whether or not it is ready."""
        return json_response({"status": "ok"})

    @app.get("/ready", responses={200: {"model": Readiness}, 503: {"model": Readiness}})
    async def ready() -> Response:
        """200 once the index is loaded and work is accepted; 503 while starting or draining."""
        if state.ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "reason": state.not_ready_reason}, 503,
                             {"Retry-After": str(config.retry_after_s)})

    @app.get("/info", responses={200: {"model": Info}, **error_responses(401, 503)})
    async def info() -> Response:
        """Retriever (with fingerprint), corpus, reward config, alarms (active ones first), batching settings,
        version."""
        scorer = state.require_ready()
        manifest = scorer.index.manifest
        return json_response({
            "version": __version__,
            "retriever": scorer.retriever.describe(),
            "index": {"path": scorer.index.name, "corpus_size": len(scorer.index), "dim": scorer.index.dim,
                      "fingerprint": scorer.index.fingerprint, "created_at": manifest.get("created_at"),
                      "device": str(scorer.index.device)},
            "reward_config": scorer.config.model_dump(),
            "sample_keys": list(scorer.keys),
            "alarms": scorer.alarms.snapshot() if scorer.alarms is not None else None,
            "ensemble": scorer.describe() if isinstance(scorer, EnsembleScorer) else None,
            "server": config.public_dict(),
            "uptime_s": time.time() - state.started_at,
        })

    @app.get("/metrics", response_class=Response, responses={**metrics_response(), **error_responses(401)})
    async def metrics() -> Response:
        """Prometheus exposition of the service's own registry."""
        return Response(content=state.metrics.render(), media_type=CONTENT_TYPE)

    app.guard = GuardMiddleware(functools.partial(FastAPI.__call__, app), state)
    return app


def create_app_from_config(config: ServeConfig) -> FastAPI:
    """The service that loads its retriever and index from ``config`` at startup (ready after the checks)."""
    return create_app(None, config)
