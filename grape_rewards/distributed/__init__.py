"""Scale-out: a corpus split into shards (on several GPUs, processes or nodes) and the reward service on Ray.

- :func:`shard_index` splits an index folder into S shard folders (each a valid index; ``grape-rewards index
  shard``); :func:`read_shard_set` validates such a folder.
- :class:`ShardedIndex` ranks over the shards exactly (rank is additive over a partition) and duck-types
  :class:`~grape_rewards.corpus.CorpusIndex` for :class:`~grape_rewards.scorer.RewardScorer`. Its shards are
  held by a backend: :class:`LocalShards` (in this process, one device per shard) or
  :class:`~grape_rewards.distributed.ray_shards.RayShards` (Ray actors, one per shard, each on its GPU).
- :mod:`grape_rewards.distributed.ray_serve`: ``grape-rewards serve --ray`` (the same FastAPI app under Ray Serve,
  R replicas, optionally over Ray shard actors).
- :mod:`grape_rewards.distributed.ray_resources`: what ``serve --ray`` reserves (CPUs, GPUs), checked against the
  cluster before any actor is placed.

Importing this package is cheap (the CLI imports ``ray_serve`` to add its flags): ``shard`` (torch) loads on first
use, and Ray only when a Ray function runs (every module imports without Ray installed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .shard import (
        IncompleteCorpusError,
        LocalShards,
        ShardBackend,
        ShardedIndex,
        ShardScan,
        ShardSet,
        ShardUnavailable,
        is_shard_set,
        load_sharded_scorer,
        read_shard_set,
        shard_bounds,
        shard_index,
    )

__all__ = [
    "IncompleteCorpusError", "LocalShards", "ShardBackend", "ShardScan", "ShardSet", "ShardUnavailable",
    "ShardedIndex", "is_shard_set", "load_sharded_scorer", "read_shard_set", "shard_bounds", "shard_index",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import shard

        return getattr(shard, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
