"""The ``grape-rewards`` command: :func:`build_parser` adds the sub-commands (each verb's module registers its own),
:func:`main` dispatches and turns a bad input into one error line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .cli_args import (
    IndexListAction,
    add_retriever_args,
    add_reward_args,
    retriever_from_args,
    retriever_overrides,
    reward_config_from_args,
)

# Modules that add their own sub-commands, in the order --help lists them after demo, serve, index and score: each
# has ``register(subparsers)`` and imports nothing heavy at module level (the parser is built on every invocation).
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "grape_rewards.prepare.cli",
    "grape_rewards.adapters.cli",
    "grape_rewards.rewrite.cli",
    "grape_rewards.eval.cli",
    "grape_rewards.eval.reward_bench_cli",
)

DESCRIPTION = """\
Rewards for GRPO training of a query-rewriting LLM: a rewrite is paid by where a frozen retriever ranks its
true target among a whole corpus.

Start here:
  grape-rewards demo           the rank reward beside the similarity reward on 100 packaged captions (offline)
  grape-rewards serve --demo   the reward service on those captions, with a request to try
"""

EPILOG = "Each command has its own help: grape-rewards COMMAND --help."


# -- demo ----------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_RETRIEVER, run_demo

    if args.index and len(args.index) > 1:
        raise ValueError(f"--index: the demo uses one index, got {len(args.index)}: {', '.join(args.index)}")
    index = args.index[0] if args.index else None
    rows = run_demo(retriever=retriever_from_args(args, args.retriever or DEFAULT_RETRIEVER), index=index,
                    queries=args.queries, config=reward_config_from_args(args))
    if args.json:
        _write_json(args.json, rows)
    return 0


# -- index ---------------------------------------------------------------------------------------------
def cmd_index_build(args: argparse.Namespace) -> int:
    from .corpus import build_index, read_source

    source = read_source(args.source)
    retriever = retriever_from_args(args)
    index = build_index(source, retriever, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                        overwrite=args.overwrite, num_workers=args.num_workers, progress=not args.quiet)
    print(f"built {args.out}: {len(index)} items x {index.dim} dims, retriever {retriever.spec} "
          f"(fingerprint {retriever.fingerprint})")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from .corpus import index_info

    print(json.dumps(index_info(args.dir), indent=2, ensure_ascii=False))
    return 0


def cmd_index_shard(args: argparse.Namespace) -> int:
    from .distributed.shard import shard_index

    folders = shard_index(args.dir, args.out, args.num_shards, overwrite=args.overwrite)
    for folder in folders:
        print(folder)
    return 0


# -- score ---------------------------------------------------------------------------------------------
def cmd_score(args: argparse.Namespace) -> int:
    from .ensemble import scorer_from_indexes
    from .scoring_io import score_jsonl

    scorer = scorer_from_indexes(args.index, reward_config_from_args(args), retriever=args.retriever,
                         **retriever_overrides(args))
    summary = score_jsonl(args.input, args.output, scorer, batch_size=args.batch_size, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _write_json(path: str | Path, obj: object) -> None:
    from .corpus.files import atomic_write_json

    atomic_write_json(path, obj)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grape-rewards", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"grape-rewards {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    p = sub.add_parser("demo", help="the rank reward beside the similarity reward on the packaged captions (offline)",
                       description="For three shifted queries (Chinese, long and rambling, vague), the original "
                                   "query's rank and a GRPO group of candidate rewrites with the rank reward beside "
                                   "the similarity reward, on 100 packaged captions and all-MiniLM-L6-v2 (offline). "
                                   "--retriever, --index and --queries run it on your own retriever and corpus.")
    add_retriever_args(p, required=False)
    p.add_argument("--index", action=IndexListAction, help="an index folder to use instead of the packaged captions")
    p.add_argument("--queries", type=Path, help="JSONL of demo queries (query_id, kind, query, target_ids, candidates)")
    p.add_argument("--json", type=Path, help="also write the table rows as JSON here")
    add_reward_args(p)
    p.set_defaults(func=cmd_demo)

    importlib.import_module("grape_rewards.serve_cli").register(sub)

    p = sub.add_parser("index", help="embed a corpus (build), print an index's manifest (info), split it (shard)",
                       description="Embed a corpus into an index folder, inspect one, or split one across GPUs.")
    isub = p.add_subparsers(dest="index_command", required=True, title="commands", metavar="COMMAND")
    b = isub.add_parser("build", help="embed a corpus: an image folder, or a JSONL/CSV of id+image or id+text rows",
                        description="Embed a corpus into an index folder, in resumable shards: rerun the same command "
                                    "after an interruption and it continues where it stopped.\n\n"
                                    "  grape-rewards index build --retriever text:all-MiniLM-L6-v2 --source "
                                    "captions.jsonl --out index/",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_retriever_args(b)
    b.add_argument("--source", required=True, type=Path,
                   help="an image folder, or a .jsonl/.csv file of {id, image} or {id, text} rows")
    b.add_argument("--out", required=True, type=Path, help="the index folder to write")
    b.add_argument("--batch-size", type=int, default=64, help="items per encoding batch (default 64)")
    b.add_argument("--shard-size", type=int, default=4096, help="items per resumable shard (default 4096)")
    b.add_argument("--num-workers", type=int, default=4, help="image decoding threads (default 4)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_index_build)
    i = isub.add_parser("info", help="print an index's manifest (retriever, size, checksums)",
                        description="Print an index's manifest as JSON: its retriever and fingerprint, size, "
                                    "dimensions, checksums.")
    i.add_argument("dir", type=Path, help="the index folder")
    i.set_defaults(func=cmd_index_info)
    sh = isub.add_parser("shard", help="split an index into S shard indexes (a corpus across GPUs)",
                         description="Split an index into S shard indexes, for grape-rewards serve --ray --shards S.")
    sh.add_argument("dir", type=Path, help="the index to split")
    sh.add_argument("--out", required=True, type=Path, help="the folder to write shard-000-of-S/... into")
    sh.add_argument("--num-shards", "-s", required=True, type=int, metavar="S", help="how many shards")
    sh.add_argument("--overwrite", action="store_true", help="replace the shards already at --out")
    sh.set_defaults(func=cmd_index_shard)

    p = sub.add_parser("score", help="score a JSONL of rewrites offline (the same code as the service)",
                       description="Score a JSONL of rewrites against an index, with the same code and the same "
                                   "checks as the service: every row is checked before any is scored, and nothing "
                                   "is written when one is refused.")
    p.add_argument("--index", required=True, action=IndexListAction,
                   help="the index folder; several (comma-separated or --index repeated) for an ensemble of their "
                        "retrievers over the same ids")
    add_retriever_args(p, required=False)
    p.add_argument("--input", required=True, type=Path,
                   help="JSONL rows: completion or rewrite, target_ids, [excluded_ids, reference_id, query_id, "
                        "original_query]")
    p.add_argument("--output", required=True, type=Path, help="JSONL: each input row plus its reward and statistics")
    p.add_argument("--batch-size", type=int, default=256, help="rows scored together (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_reward_args(p)
    p.set_defaults(func=cmd_score)

    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, KeyError) as exc:
        if args.verbose:
            raise
        message = getattr(exc, "message", None) or (exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        print(f"grape-rewards {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
