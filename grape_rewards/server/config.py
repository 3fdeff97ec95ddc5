"""The service's configuration: one pydantic model, read from YAML, environment variables and flags.

Precedence, lowest to highest: field default < YAML file (``--config``) < environment variable
``GRAPE_<FIELD>`` (e.g. ``GRAPE_MAX_BATCH_SIZE=128``, ``GRAPE_TOKEN=...``) < command-line flag
(``--max-batch-size 128``). A YAML file looks like::

    retriever: text:all-MiniLM-L6-v2      # optional: default is the spec in the index manifest
    index: /data/index/captions
    device: cuda
    reward_config: reward.yaml            # a RewardConfig YAML file, or the mapping inline:
    # reward_config: {shape: log, relative: false}
    max_batch_size: 256
    max_wait_ms: 5
    host: 127.0.0.1
    port: 8000

This module imports only pydantic and yaml (the CLI builds its flags from it on every invocation).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..index_list import parse_index_list

ENV_PREFIX = "GRAPE_"


class ConfigError(ValueError):
    """A configuration that cannot be served; the message names the field and where its value came from."""


class ServeConfig(BaseModel):
    """Everything ``grape-rewards serve`` needs. Every field is also a flag and an env variable ``GRAPE_<FIELD>``.

    >>> ServeConfig(index="idx").host, ServeConfig(index="idx").max_batch_size
    ('127.0.0.1', 256)
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    # -- what to serve ------------------------------------------------------------------------------
    index: str | list[str] = Field(min_length=1)
    """The index folder (``grape-rewards index build --out``); several (comma-separated, a YAML list, or
    ``--index`` repeated) make an ensemble of their retrievers over the same ids (the reward settings' ``ensemble``
    says how their rank parts combine)."""
    retriever: str | None = None
    """Retriever spec; default: the spec recorded in the index manifest. Its fingerprint must match the index."""
    reward_config: Any = None
    """The reward: the path of a RewardConfig YAML file, or a RewardConfig (or its mapping); default RewardConfig()."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (CUDA when available)."""
    fusion: Literal["text", "sum"] = "sum"
    """Composed retrieval: how the reference image and the rewrite are fused."""
    image_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    """Composed retrieval, ``sum`` fusion: the reference image's weight."""
    search_backend: Literal["auto", "faiss", "torch"] = "auto"
    """Top-k search for ``/retrieve``: FAISS when installed (auto), or exact torch."""
    num_threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads of the device worker (CPU); default: torch's choice."""
    gc_tuning: bool = True
    """At startup, freeze what is loaded out of the garbage collector's sight and collect the young generation
    every 100,000 allocations instead of 700 (process-wide; about twice the single-sample requests per second)."""
    fast_routes: bool = True
    """Answer the POST routes (/get_reward, /v1/rewards, /retrieve) on a short path with the same handlers and
    checks, for less CPU per request (docs/shortcuts.md). Off: the web framework's own routing."""

    # -- batching and caches --------------------------------------------------------------------------
    max_batch_size: int = Field(default=256, ge=1)
    """Most samples scored in one device batch (1 turns micro-batching off)."""
    max_wait_ms: float = Field(default=5.0, ge=0.0)
    """Longest a queued request waits for a batch to fill; the batcher only waits while more requests are
    expected (recent batches were larger than the queue), never when a lone request arrives."""
    max_queue: int = Field(default=8192, ge=1)
    """Most samples queued; beyond it requests are answered 503 with Retry-After."""
    cache_size: int = Field(default=65536, ge=0)
    """Query embeddings kept in the LRU cache (and as many original-query ranks)."""
    cache_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    """Most bytes each of those caches holds (texts of its keys and embeddings), whatever the entry count."""
    retry_after_s: int = Field(default=1, ge=0)
    """The Retry-After of a 503 (queue full, not ready, draining)."""

    # -- network and safety ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address to bind; a non-loopback one needs a token (or ``insecure``)."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port (0: any free port)."""
    token: str | None = Field(default=None, repr=False)
    """Bearer token required on every endpoint except /health, /ready and the API contract (/openapi.json).
    Set it with the env variable GRAPE_TOKEN: a --token flag is visible to every local user in the process list."""
    insecure: bool = False
    """Allow binding a non-loopback address without a token."""
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest request body; larger ones get 413."""
    max_items_per_request: int = Field(default=4096, ge=1)
    """Most samples (or /retrieve queries) in one request; more get 413."""
    max_topk: int = Field(default=1000, ge=1)
    """Largest ``topk`` of /retrieve."""
    max_text_chars: int = Field(default=20000, ge=100)
    """Every text that reaches the encoder (rewrites, original queries, /retrieve queries) is cut to this many
    characters before tokenizing (far past any retriever's context length, so the embedding is unchanged; a cut
    rewrite is still flagged overlong and truncated)."""
    body_timeout_s: float = Field(default=30.0, gt=0.0)
    """Longest wait for the next part of a request body; a client that announces more than it sends gets 408."""
    max_header_bytes: int = Field(default=65536, ge=4096)
    """Largest request head (request line and headers); uvicorn closes a connection that sends more."""
    drain_timeout_s: float = Field(default=60.0, ge=0.0)
    """On SIGTERM, how long accepted requests may take to be scored; what is still unscored then is answered 503
    with Retry-After (the clients retry it elsewhere) and the process exits without waiting for the device job."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Logging level of the service (access logs only at debug)."""

    @field_validator("index", mode="before")
    @classmethod
    def _index_paths(cls, value: Any) -> Any:
        if isinstance(value, (str, Path, list, tuple)):
            paths = parse_index_list(value, "index")
            return paths[0] if len(paths) == 1 else paths
        return value

    @property
    def index_paths(self) -> list[str]:
        """The index folder(s), as a list."""
        return [self.index] if isinstance(self.index, str) else list(self.index)

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("reward_config", mode="before")
    @classmethod
    def _reward_config_kind(cls, value: Any) -> Any:
        if value is None or isinstance(value, (str, Path, Mapping)) or hasattr(value, "model_dump"):
            return str(value) if isinstance(value, Path) else value
        raise ValueError(f"expected the path of a reward YAML file or a mapping of RewardConfig fields, got "
                         f"{type(value).__name__}")

    def load_reward_config(self) -> Any:
        """The :class:`~grape_rewards.rewards.RewardConfig` this config names (imports the reward package)."""
        from ..rewards.config import RewardConfig

        value = self.reward_config
        if value is None:
            return RewardConfig()
        if isinstance(value, RewardConfig):
            return value
        if isinstance(value, str):
            if not Path(value).is_file():
                raise ConfigError(f"reward_config: reward YAML file {value!r} does not exist")
            return RewardConfig.from_yaml(value)
        data = value.model_dump() if hasattr(value, "model_dump") else dict(value)
        return RewardConfig.model_validate(data)

    def check_bind(self) -> None:
        """Refuse a non-loopback address without a token unless ``insecure`` is set.

        >>> ServeConfig(index="i", host="0.0.0.0").check_bind()
        Traceback (most recent call last):
        ...
        grape_rewards.server.config.ConfigError: refusing to bind 0.0.0.0 ...
        """
        if is_loopback(self.host) or self.token or self.insecure:
            return
        raise ConfigError(
            f"refusing to bind {self.host} (reachable from other machines) without a token: set GRAPE_TOKEN "
            "(or --token) so clients must send 'Authorization: Bearer <token>', bind 127.0.0.1, or pass "
            "--insecure if the network is trusted")

    def uvicorn_limits(self) -> dict[str, Any]:
        """uvicorn settings that bound what a client can make the server hold: the httptools parser with the
        request head capped at ``max_header_bytes`` (:mod:`grape_rewards.server.http_protocol`).

        >>> ServeConfig(index="i").uvicorn_limits()["http"].max_head_bytes
        65536
        """
        from .http_protocol import bounded_httptools_protocol  # imports uvicorn: only when serving

        return {"http": bounded_httptools_protocol(self.max_header_bytes)}

    def public_dict(self) -> dict[str, Any]:
        """The settings without the token, for /info and logs."""
        out = self.model_dump(exclude={"token", "reward_config"})
        out["auth"] = self.token is not None
        return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Field values from ``GRAPE_<FIELD>`` environment variables (strings; pydantic converts them).

    >>> env_overrides({"GRAPE_MAX_BATCH_SIZE": "64", "GRAPE_NOPE": "1", "HOME": "/"})
    {'max_batch_size': '64'}
    """
    environ = os.environ if environ is None else environ
    out = {}
    for name in ServeConfig.model_fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            out[name] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of ServeConfig fields; a relative ``reward_config`` path is read from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of serve settings, got {type(data).__name__}")
    reward = data.get("reward_config")
    if isinstance(reward, str) and not Path(reward).is_absolute():
        data["reward_config"] = str(path.parent / reward)
    return data


def load_config(config_file: str | Path | None = None, flags: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Merge defaults < YAML < ``GRAPE_*`` env < flags into a validated :class:`ServeConfig`.

    ``flags`` holds only the options given on the command line (None values are ignored). The config file
    itself may come from ``GRAPE_CONFIG``. Errors name each bad field and where its value came from.

    >>> load_config(flags={"index": "idx", "port": 9000}, environ={"GRAPE_PORT": "1", "GRAPE_TOKEN": "t"}).port
    9000
    """
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file:
        layers.append((f"config file {config_file}", read_yaml(config_file)))
    layers.append(("environment", env_overrides(environ)))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for where, values in layers:
        for key, value in values.items():
            merged[key] = value
            source[key] = where
    try:
        return ServeConfig.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "config"
            origin = source.get(field)
            if origin == "environment":
                origin = f"env {ENV_PREFIX}{field.upper()}"
            elif origin == "flag":
                origin = f"--{field.replace('_', '-')}"
            if err["type"] == "missing" and field == "index":
                problems.append("index: no index folder given (pass --index DIR, set GRAPE_INDEX, or put index: "
                                "in the --config YAML)")
            elif err["type"] == "extra_forbidden":
                known = ", ".join(ServeConfig.model_fields)
                problems.append(f"{field}: unknown setting (from {origin}); known: {known}")
            else:
                shown = "<hidden>" if field == "token" else repr(err.get("input"))
                problems.append(f"{field}: {err['msg']} (got {shown} from {origin or 'default'})")
        raise ConfigError("invalid serve configuration: " + "; ".join(problems)) from None
