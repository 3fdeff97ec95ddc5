"""Shards held by Ray actors: one actor per shard folder, each on its own GPU (or CPU), restarted by Ray if it dies.

    backend = RayShards.launch("/data/captions-shards", num_gpus=1)    # S actors, one per shard, loaded and checked
    index = ShardedIndex(backend, "/data/captions-shards")             # what RewardScorer ranks over
    ...
    backend.close()                                                     # kills the actors it launched

Every node that may run a shard actor must see the shard folder at the same path (shared storage).

Failure handling. The actors are ``max_restarts=-1, max_task_retries=-1``: when a shard's process dies, Ray starts
a new one (which reloads the shard) and re-runs the calls that were in flight, so a request in progress simply
takes longer. If a call still fails (the actor is dead for good, or not back within ``timeout_s``), the request
fails with :class:`ShardUnavailable`; it never completes with fewer than S shards (:class:`ShardedIndex` checks
every answer). After such a failure the backend fails fast for ``cooldown_s`` (a 503 with Retry-After in the
service) instead of making every queued request wait ``timeout_s`` again.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..corpus.index import CorpusIndex, CorpusIndexError
from ..corpus.rank import NO_EXTRAS, ScanExtras, scan_counts, target_scores
from .shard import ShardScan, ShardSet, ShardUnavailable, read_shard_set

logger = logging.getLogger(__name__)


@functools.cache
def remote_shard_actor() -> Any:
    """:class:`ShardActor` as a Ray actor class: restarted whenever it dies, its calls in flight re-run.

    (Made on first use, so that importing this module needs no Ray.)
    """
    import ray

    return ray.remote(max_restarts=-1, max_task_retries=-1)(ShardActor)


class ShardActor:
    """One shard of a sharded index, loaded onto this actor's device (its GPU when it was given one); Ray runs it
    as an actor (:func:`remote_shard_actor`).

    Args:
        folder: the shard's index folder (``shard-00i-of-00S``).
        device: ``auto`` (CUDA when this actor has a GPU), ``cpu``, ``cuda``.
        num_threads: torch intra-op threads (CPU shards); default: Ray's setting (the actor's CPUs).
    """

    def __init__(self, folder: str, device: str = "auto", verify_checksum: bool = True,
                 num_threads: int | None = None) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.index = CorpusIndex.load(folder, device=device, verify_checksum=verify_checksum)
        if "shard" not in self.index.manifest:
            raise CorpusIndexError(f"{folder} is not a shard (its manifest has no 'shard' section)")
        self.shard = int(self.index.manifest["shard"]["index"])

    def describe(self) -> dict[str, Any]:
        """The shard's manifest, device, process id and node."""
        import ray

        return {"manifest": self.index.manifest, "device": str(self.index.device), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def ids(self) -> list[str]:
        return self.index.ids

    def target_scores(self, queries: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        return target_scores(queries, self.index.embeddings, targets)

    def scan(self, queries: torch.Tensor, thresholds: torch.Tensor, masked: list[list[int]],
             chunk_elements: int, extras: ScanExtras = NO_EXTRAS) -> ShardScan:
        counts = scan_counts(queries, self.index.embeddings, thresholds, masked, chunk_elements,
                             self.index.column_sums, self.index.max_row_norm, extras)
        return ShardScan(self.shard, len(self.index), counts)

    def vectors(self, rows: list[int]) -> torch.Tensor:
        return self.index.embeddings[rows].to("cpu", torch.float32)

    def contents(self, rows: list[int]) -> list[str]:
        return self.index.contents([self.index.ids[r] for r in rows])

    def search(self, queries: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, list[list[str]]]:
        return self.index.search(queries, k, backend=backend)


class RayShards:
    """A :class:`~grape_rewards.distributed.shard.ShardBackend` over S :class:`ShardActor` handles (shard order).

    Args:
        actors: one handle per shard, shard ``i`` at position ``i``.
        names, namespace: the actors' names, when named (a dead handle is looked up again by name).
        timeout_s: longest one scatter may take, restarts included, before :class:`ShardUnavailable`.
        cooldown_s: after a :class:`ShardUnavailable`, fail fast for this long (the Retry-After).
        owned: :meth:`close` kills the actors (they were launched for this backend).
    """

    def __init__(self, actors: Sequence[Any], names: Sequence[str] | None = None, namespace: str | None = None,
                 timeout_s: float = 120.0, cooldown_s: float = 5.0, owned: bool = False) -> None:
        self.actors = list(actors)
        self.names = list(names) if names is not None else None
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.owned = owned
        self._down_until = 0.0
        self._down_reason = ""
        described = self._gather({s: lambda a: a.describe.remote() for s in range(len(self.actors))})
        self.described = [described[s] for s in range(len(self.actors))]
        for s, info in enumerate(self.described):
            shard = info["manifest"].get("shard", {})
            if shard.get("index") != s or shard.get("count") != len(self.actors):
                raise CorpusIndexError(f"actor {s} holds shard {shard.get('index')} of {shard.get('count')}, expected "
                                       f"shard {s} of {len(self.actors)}")

    @classmethod
    def launch(cls, path: str | Path | ShardSet, num_gpus: float = 0.0, num_cpus: float = 1.0, device: str = "auto",
               name_prefix: str | None = None, namespace: str | None = None, verify_checksum: bool = True,
               num_threads: int | None = None, timeout_s: float = 120.0, cooldown_s: float = 5.0,
               **actor_options: Any) -> RayShards:
        """Start one actor per shard of the shard set at ``path`` (named ``<name_prefix>-<i>`` when given).

        ``num_threads``: torch threads of each actor (CPU shards; Ray's default is the actor's CPUs, at least 1).
        ``actor_options`` go to ``ShardActor.options`` (e.g. ``scheduling_strategy="SPREAD"``, ``runtime_env``).
        Returns once every shard is loaded and checked.
        """
        shard_set = path if isinstance(path, ShardSet) else read_shard_set(path)
        names = [f"{name_prefix}-{i}" for i in range(shard_set.num_shards)] if name_prefix else None
        actors = []
        for i, folder in enumerate(shard_set.folders):
            options = {"num_gpus": num_gpus, "num_cpus": num_cpus, **actor_options}
            if names is not None:
                options.update(name=names[i], namespace=namespace)
            actors.append(remote_shard_actor().options(**options).remote(str(folder.resolve()), device,
                                                                         verify_checksum, num_threads))
        try:
            return cls(actors, names, namespace, timeout_s=timeout_s, cooldown_s=cooldown_s, owned=True)
        except BaseException:
            import ray

            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise

    @classmethod
    def connect(cls, names: Sequence[str], namespace: str | None = None, timeout_s: float = 120.0,
                cooldown_s: float = 5.0) -> RayShards:
        """Use shard actors someone else launched (e.g. by the ``serve --ray`` driver, from a Serve replica)."""
        import ray

        return cls([ray.get_actor(n, namespace=namespace) for n in names], names, namespace, timeout_s=timeout_s,
                   cooldown_s=cooldown_s, owned=False)

    @property
    def num_shards(self) -> int:
        return len(self.actors)

    # -- scatter / gather with retries ---------------------------------------------------------------------------
    def _gather(self, calls: dict[int, Callable[[Any], Any]]) -> dict[int, Any]:
        """Run ``calls[s](actor s)`` on each shard; retry a shard whose actor died until it answers or time runs out."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        now = time.monotonic()
        if now < self._down_until:
            raise ShardUnavailable(f"{self._down_reason}; retry in {self._down_until - now:.1f} s",
                                   retry_after=self.cooldown_s)
        deadline = now + self.timeout_s
        pending = {s: call(self.actors[s]) for s, call in calls.items()}
        results: dict[int, Any] = {}
        attempts = dict.fromkeys(calls, 1)
        while pending:
            s, ref = next(iter(pending.items()))
            try:
                results[s] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                del pending[s]
            except GetTimeoutError:
                self._trip(f"shard {s} of {self.num_shards} did not answer within {self.timeout_s:.0f} s (its actor "
                           "is down or restarting); the corpus is only ranked whole")
                raise ShardUnavailable(self._down_reason, retry_after=self.cooldown_s) from None
            except RayActorError as exc:
                if time.monotonic() >= deadline:
                    self._trip(f"shard {s} of {self.num_shards} is unavailable ({type(exc).__name__}) after "
                               f"{attempts[s]} attempts; the corpus is only ranked whole")
                    raise ShardUnavailable(self._down_reason, retry_after=self.cooldown_s) from exc
                logger.warning("shard %d: %s; retrying (attempt %d)", s, type(exc).__name__, attempts[s] + 1)
                time.sleep(min(1.0, 0.1 * attempts[s]))
                self._refresh(s)
                attempts[s] += 1
                pending[s] = calls[s](self.actors[s])
        return results

    def _trip(self, reason: str) -> None:
        self._down_reason = reason
        self._down_until = time.monotonic() + self.cooldown_s
        logger.error("%s; failing fast for %.1f s", reason, self.cooldown_s)

    def _refresh(self, s: int) -> None:
        """Look a named actor up again (it may have been replaced)."""
        if self.names is None:
            return
        import ray

        try:
            self.actors[s] = ray.get_actor(self.names[s], namespace=self.namespace)
        except ValueError:
            pass  # not (yet) there under that name: keep the old handle

    # -- the ShardBackend protocol ------------------------------------------------------------------------------
    def manifests(self) -> list[dict[str, Any]]:
        return [info["manifest"] for info in self.described]

    def shard_ids(self) -> list[list[str]]:
        ids = self._gather({s: lambda a: a.ids.remote() for s in range(self.num_shards)})
        return [ids[s] for s in range(self.num_shards)]

    def target_scores(self, queries: torch.Tensor, targets: dict[int, list[list[int]]]) -> dict[int, torch.Tensor]:
        import ray

        q = ray.put(queries)
        return self._gather({s: (lambda a, t=t: a.target_scores.remote(q, t)) for s, t in targets.items()})

    def scan(self, queries: torch.Tensor, thresholds: torch.Tensor, masked: list[list[list[int]]],
             chunk_elements: int, extras: ScanExtras = NO_EXTRAS) -> list[ShardScan]:
        import ray

        q, th = ray.put(queries), ray.put(thresholds)
        found = self._gather({s: (lambda a, m=masked[s]: a.scan.remote(q, th, m, chunk_elements, extras))
                              for s in range(self.num_shards)})
        return [found[s] for s in range(self.num_shards)]

    def vectors(self, rows: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        return self._gather({s: (lambda a, r=r: a.vectors.remote(r)) for s, r in rows.items()})

    def contents(self, rows: dict[int, list[int]]) -> dict[int, list[str]]:
        return self._gather({s: (lambda a, r=r: a.contents.remote(r)) for s, r in rows.items()})

    def search(self, queries: torch.Tensor, k: int, backend: str) -> list[tuple[torch.Tensor, list[list[str]]]]:
        import ray

        q = ray.put(queries)
        found = self._gather({s: (lambda a: a.search.remote(q, k, backend)) for s in range(self.num_shards)})
        return [found[s] for s in range(self.num_shards)]

    def pids(self) -> list[int]:
        """The current process id of each shard actor (tests kill them)."""
        described = self._gather({s: lambda a: a.describe.remote() for s in range(self.num_shards)})
        return [described[s]["pid"] for s in range(self.num_shards)]

    def close(self) -> None:
        """Kill the actors if this backend launched them; otherwise just drop the handles."""
        if self.owned:
            import ray

            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
        self.actors = []
