"""The FastAPI app of the reward service: endpoints, auth, limits, readiness and drain.

``create_app(scorer, config)`` wraps a loaded :class:`~grape_rewards.scorer.RewardScorer` (what Ray Serve or a
test mounts); ``create_app_from_config(config)`` loads the retriever and index in its lifespan, checks the
fingerprint, and only then reports ready.

Endpoints: ``POST /get_reward`` (OpenRLHF), ``POST /v1/rewards`` (native), ``POST /retrieve`` (Search-R1 top-k),
``GET /health`` (alive), ``GET /ready`` (accepting work), ``GET /info``, ``GET /metrics`` (Prometheus).
Errors are JSON ``{"detail": message}`` with a 4xx status that names the problem; 503s carry Retry-After.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response

from .. import __version__
from ..corpus.index import CorpusIndex, IndexError_, read_manifest
from ..ensemble import EnsembleScorer
from ..scorer import RewardItem, RewardScorer
from .batcher import BatcherClosed, MicroBatcher, QueueFull
from .config import ConfigError, ServeConfig
from .metrics import CONTENT_TYPE, ENDPOINTS, ServiceMetrics
from .protocol import (
    RequestError,
    check_items,
    dumps,
    native_response,
    openrlhf_response,
    parse_body,
    parse_native,
    parse_openrlhf,
    parse_retrieve,
    retrieve_response,
)

logger = logging.getLogger("grape_rewards.server")
OPEN_PATHS = frozenset({"/health", "/ready"})
"""Answered without the token (liveness and readiness probes)."""

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
        self.batcher: MicroBatcher | None = None
        self.ready = False
        self.not_ready_reason = "starting: the index is not loaded yet"
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------------------
    async def startup(self) -> None:
        """Load (when needed), start the device worker, warm it up, then report ready."""
        if self.scorer is None:
            self.not_ready_reason = "starting: loading the retriever and the index"
            self.scorer = await asyncio.to_thread(load_scorer, self.config)
        scorer = self.scorer
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

    async def shutdown(self) -> None:
        self.begin_drain()
        if self.batcher is not None:
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
        items = parse_openrlhf(parse_body(body), config.max_items_per_request, config.max_text_chars, scorer.config)
        check_items(items, scorer, "labels[{}]")
        samples = await self.score(items)
        return dumps(openrlhf_response(samples, scorer.config))

    async def rewards(self, body: bytes) -> bytes:
        """``POST /v1/rewards`` (native) from body to answer; raises RequestError / HTTPProblem."""
        scorer = self.require_ready()
        config = self.config
        items = parse_native(parse_body(body), config.max_items_per_request, config.max_text_chars, scorer.config)
        check_items(items, scorer, "items[{}]")
        samples = await self.score(items)
        return dumps(native_response(samples, scorer.keys))

    async def score(self, items: list[RewardItem]) -> list[dict[str, float]]:
        assert self.batcher is not None
        try:
            return await self.batcher.submit(items)
        except QueueFull as exc:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise HTTPProblem(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except BatcherClosed as exc:
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise HTTPProblem(503, str(exc), {"Retry-After": str(self.config.retry_after_s)}) from None
        except (KeyError, ValueError) as exc:  # validated before enqueueing; kept as a safety net
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise HTTPProblem(422, str(message)) from None


def load_scorer(config: ServeConfig) -> RewardScorer:
    """Build the retriever, load the index (refusing a fingerprint mismatch), and make the scorer (an
    :class:`~grape_rewards.ensemble.EnsembleScorer` when ``config`` names several indexes)."""
    from ..retrievers import create_retriever

    reward_config = config.load_reward_config()
    paths = config.index_paths
    if len(paths) > 1 and config.retriever:
        raise ConfigError("retriever: an ensemble of indexes uses each index's own retriever; drop --retriever")
    retrievers, indexes = [], []
    for path in paths:
        spec = config.retriever or read_manifest(path).get("retriever", {}).get("spec")
        if not spec:
            raise IndexError_(f"index {path} does not name its retriever; pass --retriever")
        retriever = create_retriever(spec, device=config.device, fusion=config.fusion,
                                     image_weight=config.image_weight)
        retrievers.append(retriever)
        indexes.append(CorpusIndex.load(path, device=retriever.device, expected_fingerprint=retriever.fingerprint,
                                        expected_spec=retriever.spec))
    if len(paths) > 1:
        return EnsembleScorer(retrievers, indexes, reward_config, cache_size=config.cache_size)
    return RewardScorer(retrievers[0], indexes[0], reward_config, cache_size=config.cache_size)


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
    service: measured on a 2-core CPU with a near-free retriever, one process answered ~5,700 single-sample
    requests/s before and ~11,000-13,000 after. Cycles created later are still collected.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, young_threshold), middle, old)


def _retrieve(scorer: RewardScorer, queries: list[str], topk: int, refs: list[str] | None,
              backend: str) -> tuple[list[list[float]], list[list[str]]]:
    emb, _ = scorer.encode(queries)
    if scorer.retriever.takes_reference:
        ref = scorer.index.vectors(refs) if refs is not None else None
        emb = scorer.retriever.fuse_queries(emb, ref)
    scores, ids = scorer.index.search(emb, topk, backend=backend)
    return scores.tolist(), ids


# -- ASGI guard: auth, body size, request metrics ---------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Pure ASGI middleware (cheap on the hot path): bearer-token auth, body-size limit, request metrics.

    :class:`RewardApp` puts it in front of FastAPI's own middleware stack, so the two scoring routes are answered
    here without passing through it (that stack costs more CPU than the rest of a single-sample request).
    """

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state
        token = state.config.token
        self.expected = f"Bearer {token}".encode() if token else None
        self.limit = state.config.max_body_bytes
        self.fast: dict[str, Callable[[bytes], Awaitable[bytes]]] = {
            "/get_reward": state.get_reward, "/v1/rewards": state.rewards}
        """The hot scoring routes, served here without the framework's routing and request objects (about
        half the per-request CPU, which on a small machine is taken from the device worker)."""

    async def _serve_fast(self, handler: Callable[[bytes], Awaitable[bytes]], receive: Callable[[], Awaitable[dict]],
                          send: Callable[[dict], Awaitable[None]]) -> None:
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
            await _send_problem(send, exc.status, exc.message)
            return
        except HTTPProblem as exc:
            await _send_problem(send, exc.status, exc.message, exc.headers)
            return
        except Exception as exc:
            logger.exception("unhandled error while scoring")
            await _send_problem(send, 500, f"internal error: {type(exc).__name__}: {exc}")
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
                if not hmac.compare_digest(given, self.expected):
                    metrics.rejected.labels(reason="unauthorized").inc()
                    message = ("missing bearer token: send 'Authorization: Bearer <token>'" if not given
                               else "invalid bearer token")
                    await _send_problem(send_wrapper, 401, message, {"WWW-Authenticate": "Bearer"})
                    return
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    declared = int(length)
                except ValueError:
                    await _send_problem(send_wrapper, 400, "invalid Content-Length header")
                    return
                if declared > self.limit:
                    metrics.rejected.labels(reason="too_large").inc()
                    await _send_problem(send_wrapper, 413, _too_large(declared, self.limit))
                    return
            received = 0

            async def receive_limited() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise _BodyTooLarge
                return message

            try:
                handler = self.fast.get(path) if scope["method"] == "POST" else None
                if handler is not None:
                    await self._serve_fast(handler, receive_limited, send_wrapper)
                else:
                    await self.app(scope, receive_limited, send_wrapper)
            except _BodyTooLarge:
                metrics.rejected.labels(reason="too_large").inc()
                if not started:
                    await _send_problem(send_wrapper, 413, _too_large(received, self.limit))
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

    app = RewardApp(title="grape-rewards", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                    openapi_url=None)
    app.state.service = state

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> Response:
        return json_response({"detail": exc.message}, exc.status, exc.headers)

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError) -> Response:
        state.metrics.rejected.labels(reason="too_large" if exc.status == 413 else "bad_request").inc()
        return json_response({"detail": exc.message}, exc.status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return json_response({"detail": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    # The two scoring routes are served by GuardMiddleware's raw-ASGI fast path (same code: the state's
    # get_reward / rewards); these FastAPI routes answer what the fast path leaves (e.g. a GET: 405).
    @app.post("/get_reward")
    async def get_reward(request: Request) -> Response:
        """OpenRLHF's remote reward protocol."""
        return Response(await state.get_reward(await request.body()), media_type="application/json")

    @app.post("/v1/rewards")
    async def rewards(request: Request) -> Response:
        """The native API: reward items in, every component and the statistics out."""
        return Response(await state.rewards(await request.body()), media_type="application/json")

    @app.post("/retrieve")
    async def retrieve(request: Request) -> Response:
        """Top-k search in the Search-R1 shape."""
        scorer = state.require_ready()
        data = parse_body(await request.body())
        queries, topk, return_scores, refs = parse_retrieve(data, config.max_items_per_request, config.max_topk)
        if scorer.retriever.takes_reference and refs is None and getattr(scorer.retriever, "fusion", "sum") != "text":
            raise RequestError(422, f"{scorer.retriever.spec!r} fuses a reference image into each query: pass "
                                    "'reference_ids' (one corpus id per query)")
        if refs is not None:
            try:
                scorer.index.rows(refs)
            except KeyError as exc:
                raise RequestError(422, f"reference_ids: {exc}") from None
        if not queries:
            return json_response({"result": []})
        assert state.batcher is not None
        try:
            scores, ids = await state.batcher.run_on_device(_retrieve, scorer, queries, topk, refs,
                                                            config.search_backend)
        except BatcherClosed as exc:
            raise HTTPProblem(503, str(exc), {"Retry-After": str(config.retry_after_s)}) from None
        return json_response(retrieve_response(scores, ids, return_scores))

    @app.get("/health")
    async def health() -> Response:
        """Alive (the process answers), whether or not it is ready."""
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """200 once the index is loaded and work is accepted; 503 while starting or draining."""
        if state.ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "reason": state.not_ready_reason}, 503,
                             {"Retry-After": str(config.retry_after_s)})

    @app.get("/info")
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

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition of the service's own registry."""
        return Response(content=state.metrics.render(), media_type=CONTENT_TYPE)

    app.guard = GuardMiddleware(functools.partial(FastAPI.__call__, app), state)
    return app


def create_app_from_config(config: ServeConfig) -> FastAPI:
    """The service that loads its retriever and index from ``config`` at startup (ready after the checks)."""
    return create_app(None, config)
