"""The remote reward service: FastAPI + uvicorn around :class:`~grape_rewards.scorer.RewardScorer`.

Micro-batched (one device worker), cached, observable (Prometheus), safe (auth, limits, drain on SIGTERM).
Run it with ``grape-rewards serve``; mount it elsewhere (Ray Serve) with :func:`create_app`.

Importing this package is cheap: the app and the batcher (which import torch) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, ServeConfig, load_config

if TYPE_CHECKING:
    from .app import create_app, create_app_from_config
    from .batcher import BatcherClosed, MicroBatcher, QueueFull

__all__ = ["BatcherClosed", "ConfigError", "MicroBatcher", "QueueFull", "ServeConfig", "create_app",
           "create_app_from_config", "load_config"]

_LAZY = {"create_app": "app", "create_app_from_config": "app", "MicroBatcher": "batcher", "QueueFull": "batcher",
         "BatcherClosed": "batcher"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
