"""``grape-rewards serve``: run the reward service with uvicorn (the verb itself is :mod:`grape_rewards.serve_cli`).

    grape-rewards serve --index DIR [--retriever SPEC] [--config serve.yaml] [--device cuda] [--port 8000] ...

Every :class:`~grape_rewards.server.config.ServeConfig` field is a flag (``--max-batch-size``) and an environment
variable (``GRAPE_MAX_BATCH_SIZE``); flags win over the environment, which wins over the YAML file.
SIGTERM drains: /ready turns false, requests already accepted are answered, then the process exits.

This module imports nothing heavy at module level (the CLI parser is built on every invocation).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import socket
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


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per :class:`~grape_rewards.server.config.ServeConfig` field."""
    from .config import ServeConfig

    p.add_argument("--config", metavar="YAML", help="a YAML file of these settings (the keys are the flags' names with "
                                                    "underscores: max_batch_size); also GRAPE_CONFIG")
    for name, field in ServeConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("``", "").replace("%", "%%")
        default = "" if field.is_required() or field.default is None else f"default {field.default}; "
        help_text += f" ({default}env GRAPE_{name.upper()})"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind, choices = _flag_type(field.annotation)
        repeatable = list in [typing.get_origin(a) for a in typing.get_args(field.annotation)]  # str | list[str]
        p.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text,
                       metavar=None if choices else name.upper(), action="append" if repeatable else None)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~grape_rewards.server.config.ServeConfig` of :func:`add_serve_arguments`' flags (over the
    environment, over the YAML file), its bind checked before anything is loaded, and the service's logging set."""
    from .config import ServeConfig, load_config

    flags = {name: getattr(args, name, None) for name in ServeConfig.model_fields}
    config = load_config(args.config, flags)
    config.check_bind()  # before anything is loaded: fail fast
    _configure_logging(config.log_level)
    if flags.get("token"):
        logger.warning("--token is visible to every local user in the process list (ps, /proc); set the "
                       "environment variable GRAPE_TOKEN instead")
    return config


def run(config: Any) -> int:
    """Load the scorer (the index checked), then serve until SIGTERM."""
    from .app import create_app, load_scorer

    sock = bind_socket(config.host, config.port)  # before loading: a taken port fails in a second, not a minute
    logger.info("loading %s (index %s) on %s", config.retriever or "the index's retriever", config.index,
                config.device)
    scorer = load_scorer(config)  # a fingerprint mismatch stops here, before anything is bound
    app = create_app(scorer, config)
    log_next_steps(service_url(config.host, sock.getsockname()[1]), scorer.index.ids[0], bool(config.token))
    return serve(app, config, sock)


def service_url(host: str, port: int) -> str:
    """The URL at which a client on this machine reaches a service bound to ``host``:``port``.

    >>> service_url("127.0.0.1", 8000), service_url("0.0.0.0", 8000), service_url("::", 8000)
    ('http://127.0.0.1:8000', 'http://127.0.0.1:8000', 'http://[::1]:8000')
    """
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def log_next_steps(url: str, example_id: str, token: bool) -> None:
    """Log where the service listens and what to try next: a reward for one item, the API, the trainers' flags."""
    auth = ' -H "Authorization: Bearer $GRAPE_TOKEN"' if token else ""
    body = json.dumps({"items": [{"rewrite": "a short description of the target", "target_ids": [example_id]}]})
    logger.info("listening on %s (Ctrl-C or SIGTERM stops it, after answering the requests already accepted)", url)
    logger.info("try: curl -s%s %s/v1/rewards -H 'Content-Type: application/json' -d %s", auth, url, shlex.quote(body))
    logger.info("next: the API contract at %s/openapi.json; a trainer's flags: grape-rewards adapters flags "
                "openrlhf|verl|trl --url %s", url, url)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket of the service, bound now; a port another process holds is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror} (another process holds the port?); "
                           "stop it or pass another --port") from None
    sock.set_inheritable(True)
    return sock


def _configure_logging(level: str) -> None:
    """The service's own logs at ``level`` (records propagate to the root handler the main CLI installed)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grape_rewards").setLevel(level.upper())


ANSWER_MARGIN_S = 5
"""Seconds uvicorn waits for connections after ``drain_timeout_s``: time to send the 503s of what was not scored."""


def make_server(app: Any, config: Any) -> Any:
    """A ``uvicorn.Server`` whose SIGTERM/SIGINT handler first turns /ready false and starts the drain: requests
    already accepted are answered, those still unscored after ``drain_timeout_s`` get 503 with Retry-After."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.service.drain_on_signal()
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level, access_log=config.log_level == "debug",
        lifespan="on", proxy_headers=False,
        timeout_graceful_shutdown=math.ceil(config.drain_timeout_s) + ANSWER_MARGIN_S, timeout_keep_alive=30,
        server_header=False, **config.uvicorn_limits())
    return DrainingServer(uv_config)


def serve(app: Any, config: Any, sock: socket.socket | None = None) -> int:
    """Run ``app`` (on ``sock`` if given) until a signal; 0 after a clean drain, 1 if the server could not start."""
    server = make_server(app, config)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1
