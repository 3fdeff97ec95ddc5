"""What ``serve --ray`` reserves on the Ray cluster, checked before any actor is placed.

Ray places an actor only where its reservation (``num_cpus``, ``num_gpus``) fits; one that fits nowhere waits
for resources that never come, and the service would wait out its shard timeout (120 s) and then blame a shard
that is down. :func:`check_fits` compares the whole reservation with the cluster's resources first and says what
does not fit and which flags lower it. Pure Python: no Ray here (:mod:`~grape_rewards.distributed.ray_serve`
reads the cluster's resources and calls it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PRECISION = 4
"""Ray resource quantities have at most 4 decimals (0.0001 of a CPU or GPU)."""
SHARD_COUNT_HINT = "the number of shards (grape-rewards index shard --num-shards N, then --shards N)"


class ResourceShortage(ValueError):
    """The cluster cannot hold what the command reserves (the CLI prints it as a one-line error)."""


@dataclass(frozen=True)
class Reservation:
    """``count`` Ray actors of one kind (``what``: "shard actor", "replica"), each reserving ``per_actor``.

    Args:
        per_actor: Ray resource name ("CPU", "GPU") -> amount per actor (fractions allowed).
        flags: resource name -> the flag that sets ``per_actor`` for it (e.g. ``{"CPU": "--cpus-per-shard"}``).
        count_hint: what sets ``count`` (e.g. ``"--replicas"``); offered as a way down only when ``count > 1``.
    """

    what: str
    count: int
    per_actor: Mapping[str, float]
    flags: Mapping[str, str] = field(default_factory=dict)
    count_hint: str | None = None


def serve_reservations(replicas: int, cpus_per_replica: float, gpus_per_replica: float, num_shards: int = 0,
                       cpus_per_shard: float = 1.0, gpus_per_shard: float = 0.0) -> list[Reservation]:
    """What ``grape-rewards serve --ray`` reserves: its shard actors and its Serve replicas.

    Everything else it starts reserves nothing: the metrics hub actor, and Serve's controller and HTTP proxies
    (``num_cpus=0``).
    """
    for flag, value in (("--cpus-per-replica", cpus_per_replica), ("--gpus-per-replica", gpus_per_replica),
                        ("--cpus-per-shard", cpus_per_shard), ("--gpus-per-shard", gpus_per_shard)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{flag} must be a number >= 0, got {value:g}")
    out = []
    if num_shards > 0:
        out.append(Reservation("shard actor", num_shards, {"CPU": cpus_per_shard, "GPU": gpus_per_shard},
                               {"CPU": "--cpus-per-shard", "GPU": "--gpus-per-shard"}, SHARD_COUNT_HINT))
    out.append(Reservation("replica", replicas, {"CPU": cpus_per_replica, "GPU": gpus_per_replica},
                           {"CPU": "--cpus-per-replica", "GPU": "--gpus-per-replica"}, "--replicas"))
    return out


def check_fits(reservations: Sequence[Reservation], available: Mapping[str, float],
               total: Mapping[str, float] | None = None) -> None:
    """Raise :class:`ResourceShortage` unless the reservations fit in ``available``, naming the flags that lower them.

    ``available``: what the cluster can still give (Ray's ``cluster_resources()`` when nothing else runs on it,
    else ``available_resources()``); ``total``: the cluster's whole resources, to say how much others hold. One
    sentence per resource that does not fit (a resource absent from ``available`` counts as 0). The sum is a
    necessary condition only: each actor must also fit on one node.

    >>> two_cpus = {"CPU": 2.0, "memory": 8e9}
    >>> check_fits(serve_reservations(1, 0.5, 0.0, num_shards=3, cpus_per_shard=0.5), two_cpus)  # 2 CPUs: fits
    >>> check_fits(serve_reservations(1, 1.0, 0.0, num_shards=3, cpus_per_shard=1.0), two_cpus)
    Traceback (most recent call last):
    ...
    grape_rewards.distributed.ray_resources.ResourceShortage: the Ray cluster cannot hold this service: 3 shard \
actors × 1 CPU + 1 replica × 1 CPU = 4 CPUs, the cluster has 2 CPUs; lower --cpus-per-shard or --cpus-per-replica \
(fractions allowed, e.g. --cpus-per-shard 0.5 --cpus-per-replica 0.5 reserve 2 CPUs), or lower the number of \
shards (grape-rewards index shard --num-shards N, then --shards N)
    """
    problems = []
    for resource in sorted({r for res in reservations for r, amount in res.per_actor.items() if amount > 0}):
        used = [res for res in reservations if res.count > 0 and res.per_actor.get(resource, 0.0) > 0]
        asked = sum(res.count * res.per_actor[resource] for res in used)
        have = float(available.get(resource, 0.0))
        if round(asked, PRECISION) <= round(have, PRECISION):
            continue
        terms = " + ".join(f"{res.count} {_plural(res.what, res.count)} × {_amount(res.per_actor[resource], resource)}"
                           for res in used)
        has = f"the cluster has {_amount(have, resource)}"
        whole = float(total.get(resource, 0.0)) if total is not None else have
        if round(whole, PRECISION) > round(have, PRECISION):
            has += f" free (of {_amount(whole, resource)}: other actors or tasks hold the rest)"
        problems.append(f"{terms} = {_amount(asked, resource)}, {has}; {_hints(used, resource, asked, have)}")
    if problems:
        raise ResourceShortage("the Ray cluster cannot hold this service: " + "; and ".join(problems))


def _hints(used: Sequence[Reservation], resource: str, asked: float, have: float) -> str:
    """Which flags lower ``resource``: the per-actor amounts (with values that fit, when there are any), the counts."""
    flags = [res.flags[resource] for res in used if resource in res.flags]
    hint = ""
    if flags:
        notes = ["fractions allowed"]
        scale = have / asked
        example = [(res, math.floor(res.per_actor[resource] * scale * 100) / 100) for res in used
                   if resource in res.flags]
        # CPUs only: a node's CPUs are one pool, but a GPU is a unit (0.6 + 0.6 of a GPU do not share one).
        if resource == "CPU" and example and all(value > 0 for _, value in example):
            fitted = sum(res.count * value for res, value in example)
            notes[0] += (", e.g. " + " ".join(f"{res.flags[resource]} {value:g}" for res, value in example)
                         + f" reserve {_amount(fitted, resource)}")
        if resource == "GPU":
            notes.append("0 runs on the CPU")
        hint = f"lower {' or '.join(flags)} ({'; '.join(notes)})"
    counts = sorted((res.count_hint for res in used if res.count > 1 and res.count_hint),
                    key=lambda c: not c.startswith("-"))  # flags first
    if counts:
        hint += (", or " if hint else "") + "lower " + " or ".join(counts)
    return hint or "add nodes to the cluster"


def _amount(value: float, resource: str) -> str:
    """``2 CPUs``, ``1 CPU``, ``0.5 GPU``."""
    value = round(value, PRECISION)
    return f"{value:g} {resource}{'' if 0 < value <= 1 else 's'}"


def _plural(what: str, count: int) -> str:
    return what if count == 1 else what + "s"
