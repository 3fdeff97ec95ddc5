"""``/metrics`` across Ray Serve replicas: every replica's series on one page, labelled ``replica="<id>"``.

Each replica keeps its own Prometheus registry (the app's :class:`~grape_rewards.server.metrics.ServiceMetrics`).
A background thread pushes a snapshot of it every ``interval_s`` to one small named actor, :class:`MetricsHub`;
``GET /metrics`` on any replica answers its own fresh series plus the latest snapshot of every other live replica
(at most ``interval_s`` old; a replica silent for ``3 * interval_s`` is dropped). Sum over replicas in Prometheus
with ``sum without (replica) (...)``, e.g. ``sum without (replica) (rate(grape_samples_total[1m]))``.
``GET /metrics?scope=replica`` answers the replica's own registry alone, unlabelled (as the single-process service).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..server.metrics import CONTENT_TYPE

logger = logging.getLogger(__name__)

Snapshot = list[tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]]
"""(name, documentation, type, unit, [(sample name, labels, value)]) per metric family."""


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """A picklable copy of every family in ``registry``."""
    return [(family.name, family.documentation, family.type, family.unit,
             [(s.name, dict(s.labels), float(s.value)) for s in family.samples])
            for family in registry.collect()]


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(snapshots: dict[str, Snapshot], label: str = "replica") -> bytes:
    """One Prometheus exposition of several replicas' snapshots, each series labelled ``label="<replica>"``."""
    families: dict[str, Metric] = {}
    for replica in sorted(snapshots):
        for name, documentation, kind, unit, samples in snapshots[replica]:
            family = families.get(name)
            if family is None:
                family = families[name] = Metric(name, documentation, kind, unit)
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, {**labels, label: replica}, value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


@functools.cache
def remote_metrics_hub() -> Any:
    """:class:`MetricsHub` as a Ray actor class (no CPU reserved; made on first use: importing needs no Ray)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(MetricsHub)


class MetricsHub:
    """The latest metrics snapshot of each replica (a few KB each); Ray runs it as an actor."""

    def __init__(self) -> None:
        self._snapshots: dict[str, tuple[float, Snapshot]] = {}

    def put(self, replica: str, snap: Snapshot) -> None:
        self._snapshots[replica] = (time.monotonic(), snap)

    def forget(self, replica: str) -> None:
        self._snapshots.pop(replica, None)

    def get(self, max_age_s: float) -> dict[str, Snapshot]:
        now = time.monotonic()
        self._snapshots = {r: v for r, v in self._snapshots.items() if now - v[0] <= max_age_s}
        return {r: snap for r, (_, snap) in self._snapshots.items()}


class ReplicaMetrics:
    """A replica's side: push snapshots of ``registry`` to the hub, and render the page of all replicas.

    Args:
        registry: the replica's Prometheus registry.
        hub_name, namespace: the :class:`MetricsHub` actor.
        replica: this replica's id (Serve's replica tag).
    """

    def __init__(self, registry: CollectorRegistry, hub_name: str, namespace: str, replica: str,
                 interval_s: float = 2.0) -> None:
        self.registry = registry
        self.hub_name = hub_name
        self.namespace = namespace
        self.replica = replica
        self.interval_s = interval_s
        self._hub: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._push_forever, name="grape-metrics-push", daemon=True)

    def start(self) -> ReplicaMetrics:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._hub is not None:
            self._hub.forget.remote(self.replica)

    def _get_hub(self) -> Any:
        import ray

        if self._hub is None:
            self._hub = ray.get_actor(self.hub_name, namespace=self.namespace)
        return self._hub

    def _push_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self._get_hub().put.remote(self.replica, snapshot(self.registry))
            except Exception as exc:  # the hub is optional: never let metrics fail the replica
                self._hub = None
                logger.debug("metrics push failed: %s", exc)
            self._stop.wait(self.interval_s)

    async def render_all(self) -> bytes:
        """This replica's fresh series and the others' latest snapshots, labelled by replica."""
        snaps: dict[str, Snapshot] = {}
        try:
            snaps = dict(await self._get_hub().get.remote(3 * self.interval_s))
        except Exception as exc:
            self._hub = None
            logger.warning("metrics hub unreachable (%s); answering this replica's metrics only", exc)
        snaps[self.replica] = snapshot(self.registry)
        return render(snaps)


def install_cluster_metrics(app: FastAPI, hub_name: str, namespace: str, interval_s: float = 2.0) -> ReplicaMetrics:
    """Start pushing this replica's metrics, and make ``GET /metrics`` answer all replicas (``?scope=replica``:
    this one alone, unlabelled). Call on the replica, before the app serves (it replaces the app's route)."""
    from ray import serve

    state = app.state.service
    try:
        replica = serve.get_replica_context().replica_tag
    except Exception:  # built outside a Serve replica
        replica = f"pid{os.getpid()}"
    pusher = ReplicaMetrics(state.metrics.registry, hub_name, namespace, replica, interval_s).start()
    app.state.replica_metrics = pusher
    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path == "/metrics")]

    async def metrics(request: Request) -> Response:
        """Prometheus exposition of every replica, labelled ``replica`` (or ``?scope=replica``: this one)."""
        if request.query_params.get("scope") == "replica":
            return Response(content=state.metrics.render(), media_type=CONTENT_TYPE)
        return Response(content=await pusher.render_all(), media_type=CONTENT_TYPE)

    app.add_api_route("/metrics", metrics, methods=["GET"])
    return pusher
