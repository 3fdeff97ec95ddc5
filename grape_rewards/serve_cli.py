"""``grape-rewards serve``: the reward service in one process (:mod:`grape_rewards.server`), or under Ray Serve with
replicas and a sharded corpus (``--ray``, :mod:`grape_rewards.distributed`).

The verb sits above both layers, so that the server never imports the distributed layer that wraps it. Nothing
heavy is imported at module level (the CLI parser is built on every invocation).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command to the ``grape-rewards`` parser."""
    from .distributed.ray_serve import add_ray_arguments  # imports neither Ray nor torch
    from .server import cli

    p = sub.add_parser(
        "serve", help="run the remote reward service (OpenRLHF /get_reward, /v1/rewards, /retrieve, /metrics)",
        description=cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_serve_arguments(p)
    add_ray_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate the config, refuse an unsafe bind, load the index (checked), then serve until SIGTERM."""
    from .server.cli import config_from_args, run

    config = config_from_args(args)
    if args.ray:
        from .distributed.ray_serve import run_from_args

        if len(config.index_paths) > 1:
            raise ValueError("an ensemble of indexes is served without --ray (Ray Serve takes one index)")

        return run_from_args(config, args)
    return run(config)
