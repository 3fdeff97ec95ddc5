"""``grape-rewards serve``: run the reward service with uvicorn.

    grape-rewards serve --index DIR [--retriever SPEC] [--config serve.yaml] [--device cuda] [--port 8000] ...

Every :class:`~grape_rewards.server.config.ServeConfig` field is a flag (``--max-batch-size``) and an environment
variable (``GRAPE_MAX_BATCH_SIZE``); flags win over the environment, which wins over the YAML file.
SIGTERM drains: /ready turns false, requests already accepted are answered, then the process exits.

This module imports nothing heavy at module level (the CLI parser is built on every invocation).
"""

from __future__ import annotations

import argparse
import logging
import math
import types
import typing
from typing import Any

logger = logging.getLogger("grape_rewards.server")


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) of a field annotation: int, float, str, Literal[...] or Optional of those."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else (str, None)
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command to the ``grape-rewards`` parser."""
    from .config import ServeConfig

    p = sub.add_parser(
        "serve", help="run the remote reward service (OpenRLHF /get_reward, /v1/rewards, /retrieve, /metrics)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of serve settings (ServeConfig fields); also GRAPE_CONFIG")
    for name, field in ServeConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("``", "").replace("%", "%%")
        default = "required" if field.is_required() else f"default {field.default}"
        help_text += f" [env GRAPE_{name.upper()}; {default}]"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind, choices = _flag_type(field.annotation)
        repeatable = list in [typing.get_origin(a) for a in typing.get_args(field.annotation)]  # str | list[str]
        p.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text,
                       metavar=None if choices else name.upper(), action="append" if repeatable else None)
    from ..distributed.ray_serve import add_ray_arguments  # imports neither Ray nor torch

    add_ray_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate the config, refuse an unsafe bind, load the index (checked), then serve until SIGTERM."""
    from .config import ServeConfig, load_config

    flags = {name: getattr(args, name, None) for name in ServeConfig.model_fields}
    config = load_config(args.config, flags)
    config.check_bind()  # before anything is loaded: fail fast
    _configure_logging(config.log_level)
    if getattr(args, "ray", False):
        from ..distributed.ray_serve import run_from_args

        if len(config.index_paths) > 1:
            raise ValueError("an ensemble of indexes is served without --ray (Ray Serve takes one index)")

        return run_from_args(config, args)
    from .app import create_app, load_scorer

    logger.info("loading %s (index %s) on %s", config.retriever or "the index's retriever", config.index,
                config.device)
    scorer = load_scorer(config)  # a fingerprint mismatch stops here, before anything is bound
    app = create_app(scorer, config)
    return serve(app, config)


def _configure_logging(level: str) -> None:
    """The service's own logs at ``level`` (records propagate to the root handler the main CLI installed)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grape_rewards").setLevel(level.upper())


def make_server(app: Any, config: Any) -> Any:
    """A ``uvicorn.Server`` whose SIGTERM/SIGINT handler first turns /ready false, then drains gracefully."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.service.begin_drain()
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level, access_log=config.log_level == "debug",
        lifespan="on", proxy_headers=False, timeout_graceful_shutdown=max(1, math.ceil(config.drain_timeout_s)),
        timeout_keep_alive=30,
        server_header=False)
    return DrainingServer(uv_config)


def serve(app: Any, config: Any) -> int:
    """Run ``app`` until a signal; 0 after a clean drain, 1 if the server could not start (e.g. port in use)."""
    server = make_server(app, config)
    server.run()
    return 0 if server.started else 1
