"""``grape-rewards``: one command with sub-commands.

    grape-rewards demo                       the rank reward vs the similarity reward on the embedded corpus
    grape-rewards index build ...            embed a corpus (resumable)
    grape-rewards index info DIR             print an index's manifest
    grape-rewards index shard DIR ...        split an index into shards (a corpus across GPUs)
    grape-rewards score ...                  score a JSONL of rewrites offline
    grape-rewards serve ...                  the remote reward service (OpenRLHF /get_reward, native, /retrieve)
    grape-rewards prepare ...                training data for OpenRLHF, verl and TRL
    grape-rewards adapters ...               where the framework adapters are installed
    grape-rewards rewrite ...                generate rewrites of a benchmark's queries with an LLM
    grape-rewards eval ...                   Recall@K of original vs rewritten queries, score-inflation report
    grape-rewards inflation-report ...       the score-inflation report of scored JSONL files
    grape-rewards series-report ...          reward, rank, similarities, alarms over a scored JSONL, as a PNG
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

# Modules that add their own sub-commands: each has ``register(subparsers)`` and imports nothing heavy at
# module level (the parser is built on every invocation).
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "grape_rewards.serve_cli",
    "grape_rewards.eval.cli",
    "grape_rewards.eval.reward_bench_cli",
    "grape_rewards.rewrite.cli",
    "grape_rewards.prepare.cli",
    "grape_rewards.adapters.cli",
)


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
    parser = argparse.ArgumentParser(prog="grape-rewards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"grape-rewards {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="rank reward vs similarity reward on the embedded corpus (offline)")
    add_retriever_args(p, required=False)
    p.add_argument("--index", action=IndexListAction, help="an index folder to use instead of the embedded captions")
    p.add_argument("--queries", type=Path, help="JSONL of demo queries (query_id, kind, query, target_ids, candidates)")
    p.add_argument("--json", type=Path, help="also write the table rows as JSON here")
    add_reward_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("index", help="build or inspect an embedded corpus")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed a corpus: image folder, or JSONL/CSV manifest of id+image or id+text")
    add_retriever_args(b)
    b.add_argument("--source", required=True, type=Path, help="image folder, or .jsonl/.csv manifest")
    b.add_argument("--out", required=True, type=Path, help="index folder to write")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--shard-size", type=int, default=4096, help="items per resumable shard")
    b.add_argument("--num-workers", type=int, default=4, help="image decoding threads")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_index_build)
    i = isub.add_parser("info", help="print an index's manifest")
    i.add_argument("dir", type=Path)
    i.set_defaults(func=cmd_index_info)
    sh = isub.add_parser("shard", help="split an index into S shard indexes (for a corpus sharded across GPUs)")
    sh.add_argument("dir", type=Path, help="the index to split")
    sh.add_argument("--out", required=True, type=Path, help="folder to write shard-000-of-S/... into")
    sh.add_argument("--num-shards", "-s", required=True, type=int)
    sh.add_argument("--overwrite", action="store_true")
    sh.set_defaults(func=cmd_index_shard)

    p = sub.add_parser("score", help="score a JSONL of rewrites with the same code path as the server")
    p.add_argument("--index", required=True, action=IndexListAction,
                   help="the index folder; several (comma-separated or --index repeated) for an ensemble of their "
                        "retrievers over the same ids")
    add_retriever_args(p, required=False)
    p.add_argument("--input", required=True, type=Path,
                   help="JSONL rows: completion or rewrite, target_ids, [excluded_ids, reference_id, query_id, "
                        "original_query]")
    p.add_argument("--output", required=True, type=Path, help="JSONL: each input row plus its reward and statistics")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--quiet", action="store_true")
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
