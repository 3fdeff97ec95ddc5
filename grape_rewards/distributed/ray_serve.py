"""``grape-rewards serve --ray``: the same FastAPI app under Ray Serve, R replicas, optionally over a sharded corpus.

    grape-rewards serve --ray --index DIR --replicas 4 --gpus-per-replica 1                  # a local Ray
    grape-rewards serve --ray --ray-address auto --index SHARDS --shards 4 --replicas 2      # the trainer's cluster

Each replica runs the app of :func:`grape_rewards.server.create_app` (``@serve.ingress`` with a builder, evaluated
on the replica), so the trainer still sees one URL (Serve's proxy, ``--host``/``--port``) speaking the same
protocols, with the same auth, limits and errors. Micro-batching is the app's own :class:`MicroBatcher`, per
replica (Serve's ``@serve.batch`` would do the same job for handle calls, but the HTTP path already has it, with the
per-request fault isolation and metrics of the single-process service); ``max_ongoing_requests`` is raised so that
a replica sees enough concurrent requests to fill its batches. ``/metrics`` answers every replica's series labelled
``replica="<id>"`` (:mod:`grape_rewards.distributed.ray_metrics`); ``/metrics?scope=replica`` one replica's.

With shards (``--shards S``, over a folder written by ``grape-rewards index shard``), S Ray actors hold the shards
(``--gpus-per-shard`` each) and every replica ranks over all of them: the replica encodes the queries once and
scatters them (:class:`~grape_rewards.distributed.shard.ShardedIndex` over
:class:`~grape_rewards.distributed.ray_shards.RayShards`). A shard that dies is restarted by Ray and the calls in
flight are re-run; a shard that stays down makes requests fail with 503 + Retry-After, never with a rank over part
of the corpus. A replica that dies is replaced by Serve; requests in flight on it are answered 500 by Serve's
proxy and should be retried by the client (scoring is a pure function of the request).

Before placing any actor, the reservations (shard actors and replicas, CPUs and GPUs) are checked against the
cluster (:mod:`~grape_rewards.distributed.ray_resources`): what does not fit is refused at once, with the flags
that lower it, instead of an actor waiting for resources that never come.

The retriever, index and shard folders must be readable at the same paths on every node that runs a replica or
a shard actor (shared storage), and grape-rewards installed there (or passed in ``runtime_env``).
The process that runs ``serve --ray`` owns the shard actors and the metrics hub: keep it running (SIGTERM drains
and removes everything; after a SIGKILL, ``serve shutdown`` removes the Serve app). This module imports Ray only
inside its functions (the CLI imports it to add its flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..server.config import ServeConfig
    from .ray_resources import Reservation
    from .ray_shards import RayShards

logger = logging.getLogger("grape_rewards.server")
APP_NAME = "grape-rewards"
NAMESPACE = "grape_rewards"
"""Ray namespace of the shard actors and the metrics hub (the Serve app itself lives in Serve's namespace)."""


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray``, ``--ray-address``, ``--replicas``, ``--gpus-per-replica``, ``--shards`` (and a few more)."""
    g = parser.add_argument_group("Ray Serve (scale-out: replicas and a sharded corpus; see docs/scaling.md)")
    g.add_argument("--ray", action="store_true", help="run the service under Ray Serve (same URL and protocols)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster to join: 'auto' (the cluster of this node, e.g. the trainer's) or "
                        "ray://HOST:10001; default: start a local Ray")
    g.add_argument("--replicas", type=int, default=1, metavar="R", help="service replicas (default 1)")
    g.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                   help="GPUs per replica, fractions allowed (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--shards", type=int, default=0, metavar="S",
                   help="serve --index, a folder written by 'grape-rewards index shard', from S shard actors "
                        "(0: shard actors only if --index is such a folder)")
    g.add_argument("--gpus-per-shard", type=float, default=None, metavar="G",
                   help="GPUs per shard actor (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C",
                   help="CPUs per replica, fractions allowed (default 1)")
    g.add_argument("--cpus-per-shard", type=float, default=1.0, metavar="C",
                   help="CPUs per shard actor, fractions allowed (default 1)")
    g.add_argument("--max-ongoing-requests", type=int, default=None, metavar="N",
                   help="requests one replica holds at once (default: 2 x --max-batch-size, at least 64)")
    g.add_argument("--no-resource-check", dest="check_resources", action="store_false",
                   help="place the actors even when the cluster's free CPUs/GPUs cannot hold them all now (an "
                        "autoscaling cluster that adds nodes on demand); default: refuse at once, naming the flags "
                        "that lower the reservation")


def run_from_args(config: ServeConfig, args: argparse.Namespace) -> int:
    """``grape-rewards serve --ray ...``: serve until SIGTERM/SIGINT, then drain and clean up."""
    result = serve_with_ray(config, ray_address=args.ray_address, replicas=args.replicas,
                            gpus_per_replica=args.gpus_per_replica, num_shards=args.shards,
                            gpus_per_shard=args.gpus_per_shard, cpus_per_replica=args.cpus_per_replica,
                            cpus_per_shard=args.cpus_per_shard, max_ongoing_requests=args.max_ongoing_requests,
                            check_resources=args.check_resources)
    return int(result)  # type: ignore[arg-type]


@dataclass
class RayService:
    """A running ``serve --ray`` deployment (what :func:`serve_with_ray` returns with ``blocking=False``)."""

    url: str
    app_name: str
    shards: RayShards | None
    hub: Any
    started_ray: bool

    def shutdown(self) -> None:
        """Delete the Serve app (replicas drain), kill the shard actors and the hub; stop Ray if we started it."""
        import ray
        from ray import serve

        try:
            serve.delete(self.app_name)
        finally:
            if self.shards is not None:
                self.shards.close()
            if self.hub is not None:
                ray.kill(self.hub, no_restart=True)
            if self.started_ray:
                serve.shutdown()
                ray.shutdown()


def serve_with_ray(config: ServeConfig, ray_address: str | None = None, replicas: int = 1,
                   gpus_per_replica: float | None = None, num_shards: int = 0, *,
                   gpus_per_shard: float | None = None, cpus_per_replica: float = 1.0, cpus_per_shard: float = 1.0,
                   max_ongoing_requests: int | None = None, shard_timeout_s: float = 120.0,
                   app_name: str = APP_NAME, blocking: bool = True, check_resources: bool = True) -> RayService | int:
    """Deploy the reward service on Ray Serve: ``replicas`` copies of the app, over ``num_shards`` shard actors.

    Args:
        config: the service settings (``host``/``port`` are the Serve proxy's; ``device`` is decided per replica:
            CUDA when it has GPUs).
        ray_address: ``None`` starts a local Ray (stopped on exit); ``"auto"`` or ``ray://...`` joins a cluster
            (only this app and its actors are removed on exit).
        gpus_per_replica / gpus_per_shard: default 1 when the cluster has GPUs, else 0.
        num_shards: 0 serves ``config.index`` whole in every replica, unless it is a shard set (then its S
            shards); S > 0 requires a shard set of S shards.
        max_ongoing_requests: per replica; default ``max(64, 2 * config.max_batch_size)``.
        shard_timeout_s: longest a scatter to the shards may take (restarts included) before a 503.
        check_resources: before placing any actor, check that the cluster can hold the shard actors and replicas
            (:func:`check_cluster_fits`); a :class:`~grape_rewards.distributed.ray_resources.ResourceShortage`
            (a ``ValueError``) otherwise.
        blocking: serve until SIGTERM/SIGINT and return 0; else return the :class:`RayService` at once.
    """
    import ray
    from ray import serve

    from .ray_resources import serve_reservations
    from .shard import is_shard_set, read_shard_set

    config.check_bind()
    if config.port == 0:
        raise ValueError("--ray needs a fixed --port: it is the port of Ray Serve's proxy")
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    shard_set = None
    if num_shards > 0 or is_shard_set(config.index):
        shard_set = read_shard_set(config.index)
        if num_shards and shard_set.num_shards != num_shards:
            raise ValueError(f"{config.index} holds {shard_set.num_shards} shards, --shards asks for {num_shards}; "
                             f"re-shard with grape-rewards index shard ... --num-shards {num_shards}")

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=True)
    stop = threading.Event()
    if blocking and threading.current_thread() is threading.main_thread():
        # From here on SIGTERM/SIGINT only ask to stop (after ray.init, which installs its own handler): a signal
        # during the start-up still ends in the clean shutdown below.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    shards = hub = None
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        gpus_per_replica = (1.0 if has_gpus else 0.0) if gpus_per_replica is None else gpus_per_replica
        gpus_per_shard = (1.0 if has_gpus else 0.0) if gpus_per_shard is None else gpus_per_shard
        reservations = serve_reservations(replicas, cpus_per_replica, gpus_per_replica,
                                          shard_set.num_shards if shard_set is not None else 0,
                                          cpus_per_shard, gpus_per_shard)
        if check_resources:
            check_cluster_fits(reservations, nothing_placed=started_ray)
        prefix = f"{app_name}-{os.getpid()}"
        shard_names = None
        if shard_set is not None:
            from .ray_shards import RayShards

            logger.info("starting %d shard actors (%s GPUs, %s CPUs each) for %s", shard_set.num_shards,
                        gpus_per_shard, cpus_per_shard, config.index)
            shards = RayShards.launch(shard_set, num_gpus=gpus_per_shard, num_cpus=cpus_per_shard,
                                      name_prefix=f"{prefix}-shard", namespace=NAMESPACE, timeout_s=shard_timeout_s,
                                      num_threads=config.num_threads)
            shard_names = shards.names
        from .ray_metrics import remote_metrics_hub

        hub_name = f"{prefix}-metrics"
        hub = remote_metrics_hub().options(name=hub_name, namespace=NAMESPACE).remote()
        device = "cpu" if config.device == "cpu" or gpus_per_replica <= 0 else "cuda"  # the replica's own GPU(s)
        replica_config = config.model_copy(update={"device": device})
        deployment = build_deployment(replica_config, replicas=replicas, gpus_per_replica=gpus_per_replica,
                                      cpus_per_replica=cpus_per_replica, shard_names=shard_names,
                                      hub_name=hub_name, shard_timeout_s=shard_timeout_s,
                                      max_ongoing_requests=max_ongoing_requests)
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(deployment.bind(), name=app_name, route_prefix="/", blocking=False)
    except BaseException:
        if shards is not None:
            shards.close()
        if hub is not None:
            ray.kill(hub, no_restart=True)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        raise
    service = RayService(f"http://{config.host}:{config.port}", app_name, shards, hub, started_ray)
    logger.info("serving %s on %s: %d replicas (%s GPUs each)%s", config.index, service.url, replicas,
                gpus_per_replica, f", {shard_set.num_shards} shard actors" if shard_set is not None else "")
    if not blocking:
        return service
    while not stop.wait(1.0):
        pass
    logger.info("stopping: draining the replicas")
    service.shutdown()
    return 0


def check_cluster_fits(reservations: Sequence[Reservation], nothing_placed: bool) -> None:
    """:func:`~grape_rewards.distributed.ray_resources.check_fits` against this Ray cluster (``ray.init`` done).

    ``nothing_placed`` (a Ray this process just started): the cluster's total resources; otherwise (a cluster
    joined, e.g. the trainer's) what is still free, as the message then says.
    """
    import ray

    from .ray_resources import check_fits

    total = ray.cluster_resources()
    check_fits(reservations, total if nothing_placed else ray.available_resources(), total)


def build_deployment(config: ServeConfig, replicas: int, gpus_per_replica: float, cpus_per_replica: float,
                     shard_names: list[str] | None, hub_name: str | None, shard_timeout_s: float = 120.0,
                     max_ongoing_requests: int | None = None) -> Any:
    """The Serve deployment whose replicas each run :func:`build_replica_app` (``@serve.ingress`` of a builder)."""
    from ray import serve

    def build_app() -> FastAPI:
        return build_replica_app(config, shard_names, hub_name, shard_timeout_s)

    @serve.deployment(
        name="GrapeRewards", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=max_ongoing_requests or max(64, 2 * config.max_batch_size),
        graceful_shutdown_timeout_s=max(1.0, config.drain_timeout_s), graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5.0, health_check_timeout_s=30.0)
    @serve.ingress(build_app)
    class GrapeRewards:
        """One replica of the reward service: the FastAPI app of ``create_app``, built on the replica."""

    return GrapeRewards


def build_replica_app(config: ServeConfig, shard_names: list[str] | None, hub_name: str | None,
                      shard_timeout_s: float = 120.0) -> FastAPI:
    """On a replica: the service app (over the shard actors when named), with 503s for shard outages and the
    all-replica ``/metrics``."""
    from ..server.app import create_app, create_app_from_config

    if shard_names:
        from .ray_shards import RayShards
        from .shard import load_sharded_scorer

        backend = RayShards.connect(shard_names, namespace=NAMESPACE, timeout_s=shard_timeout_s)
        app = create_app(load_sharded_scorer(config, backend=backend), config)
    else:
        app = create_app_from_config(config)
    add_shard_error_handlers(app, config.retry_after_s)
    if hub_name is not None:
        from .ray_metrics import install_cluster_metrics

        install_cluster_metrics(app, hub_name, NAMESPACE)
    return app


def add_shard_error_handlers(app: FastAPI, retry_after_s: float) -> None:
    """Answer :class:`ShardUnavailable` and :class:`IncompleteCorpusError` with 503 + Retry-After (clients retry).

    Scoring errors reach the client through ``ServiceState.score`` (the app's fast path for ``/get_reward`` and
    ``/v1/rewards`` answers anything else it raises with 500), so that method is wrapped on this app's state;
    ``/retrieve`` and the other routes go through FastAPI's exception handlers.
    """
    from fastapi import Request
    from fastapi.responses import Response

    from ..server.app import HTTPProblem, json_response
    from .shard import IncompleteCorpusError, ShardUnavailable

    def problem(exc: Exception) -> HTTPProblem:
        retry_after = max(1, round(getattr(exc, "retry_after", retry_after_s)))
        return HTTPProblem(503, f"corpus shard unavailable: {exc}", {"Retry-After": str(retry_after)})

    state = app.state.service
    score = state.score

    async def score_or_503(items: Any, rows: Any) -> Any:
        try:
            return await score(items, rows)
        except (ShardUnavailable, IncompleteCorpusError) as exc:
            raise problem(exc) from None

    state.score = score_or_503

    async def unavailable(request: Request, exc: Exception) -> Response:
        p = problem(exc)
        return json_response({"detail": p.message}, p.status, p.headers)

    app.add_exception_handler(ShardUnavailable, unavailable)
    app.add_exception_handler(IncompleteCorpusError, unavailable)
