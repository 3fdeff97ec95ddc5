"""``grape-rewards serve``: the reward service in one process (:mod:`grape_rewards.server`), or under Ray Serve with
replicas and a sharded corpus (``--ray``, :mod:`grape_rewards.distributed`).

The verb sits above both layers, so that the server never imports the distributed layer that wraps it. Nothing
heavy is imported at module level (the CLI parser is built on every invocation).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("grape_rewards.server")

USAGE = "grape-rewards serve (--index DIR | --demo) [--device DEVICE] [--port PORT] [more settings below]"

DESCRIPTION = """\
Run the reward service: OpenRLHF's POST /get_reward, the native POST /v1/rewards, POST /retrieve, and /metrics.

Most runs need three flags:
  --index DIR    the index to rank against (grape-rewards index build --out DIR), or --demo
  --device DEV   cuda:0 to run the retriever on a GPU (default auto: a GPU when there is one)
  --port PORT    the TCP port (default 8000)

  grape-rewards serve --demo                                try it: the packaged demo captions, nothing to prepare
  grape-rewards serve --index index/ --device cuda:0 --port 8000

The service listens on 127.0.0.1 only, unless it has a token (set GRAPE_TOKEN) or --insecure. Every setting below
is also a key of a YAML file (--config serve.yaml) and an environment variable (GRAPE_MAX_BATCH_SIZE for
--max-batch-size); a flag wins over the environment, which wins over the file. Ctrl-C or SIGTERM stops it after
answering the requests already accepted.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command to the ``grape-rewards`` parser."""
    from .distributed.ray_serve import add_ray_arguments  # imports neither Ray nor torch
    from .server import cli

    p = sub.add_parser(
        "serve", help="run the reward service that OpenRLHF, verl and TRL call (try: grape-rewards serve --demo)",
        usage=USAGE, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true",
                   help="serve the packaged demo corpus (100 captions, all-MiniLM-L6-v2; needs grape-rewards[demo]): "
                        "its index is built into a temporary folder, removed when the service stops")
    cli.add_serve_arguments(p)
    add_ray_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate the config, refuse an unsafe bind, load the index (checked), then serve until SIGTERM."""
    if not args.demo:
        return _serve(args)
    if args.index:
        raise ValueError("--demo serves the packaged demo captions: leave out --index (or leave out --demo)")
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # until the service's own handler: clean up on SIGTERM
    try:
        with tempfile.TemporaryDirectory(prefix="grape-rewards-demo-") as folder:
            args.index = [str(Path(folder) / "captions")]
            return _serve(args, demo=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(args: argparse.Namespace, demo: bool = False) -> int:
    from .server.cli import config_from_args, run

    config = config_from_args(args)
    if demo:
        build_demo_index(config.index_paths[0], config.retriever, config.device)
    if args.ray:
        from .distributed.ray_serve import run_from_args

        if len(config.index_paths) > 1:
            raise ValueError("an ensemble of indexes is served without --ray (Ray Serve takes one index)")

        return run_from_args(config, args)
    return run(config)


def build_demo_index(out: str, retriever_spec: str | None, device: str) -> None:
    """Embed the packaged demo captions into ``out`` (by ``retriever_spec``, default the demo's MiniLM)."""
    from .corpus import build_index, read_source
    from .demo_data import DEFAULT_RETRIEVER, data_path
    from .retrievers import create_retriever

    spec = retriever_spec or DEFAULT_RETRIEVER
    logger.info("embedding the demo captions with %s into %s (removed when the service stops)", spec, out)
    build_index(read_source(data_path("captions.jsonl")), create_retriever(spec, device=device), out, progress=False)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM before the service runs: exit through the ``finally`` blocks (the demo's temporary folder goes)."""
    sys.exit(128 + signum)
