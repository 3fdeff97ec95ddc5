"""``grape-rewards prepare``: write the training files of a benchmark split (or a JSONL of queries).

    grape-rewards prepare --benchmark cirr --root /data/cirr --split train --out data/cirr
    grape-rewards prepare --benchmark flickr30k-cn --root /data/flickr30k-cn --split train --out data/f30k-cn
    grape-rewards prepare --queries my_queries.jsonl --task longform --out data/mine
    grape-rewards prepare --queries my_queries.jsonl --index index/ --out data/mine   # task from the index's corpus

writes ``OUT/openrlhf/<split>.jsonl``, ``OUT/verl/<split>.parquet`` and ``OUT/trl/<split>.jsonl`` (``--format``
picks). Queries without known targets (hidden test labels) are left out.

This module imports nothing heavy at module level (the CLI parser is built on every invocation).
"""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Write the training files of a benchmark split, or of a JSONL of queries: OUT/openrlhf/<split>.jsonl,
OUT/verl/<split>.parquet and OUT/trl/<split>.jsonl (--format picks). Queries without known targets (hidden test
labels) are left out.

  grape-rewards prepare --benchmark cirr --root /data/cirr --split train --out data/cirr
  grape-rewards prepare --queries my_queries.jsonl --task longform --out data/mine
  grape-rewards prepare --queries my_queries.jsonl --index index/ --out data/mine   # the task from the index
"""


def _loader_args(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--loader-arg expects KEY=VALUE, got {pair!r}")
        out[key.replace("-", "_")] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..datasets.schema import IMAGE_TASKS
    from .rows import (
        default_task,
        index_modality,
        queries_from_benchmark,
        read_queries_jsonl,
        tasks_for_modality,
        with_targets,
    )
    from .write import FORMATS, write_training_data

    modality = index_modality(args.index) if args.index else None
    if modality is not None and args.task is not None and (args.task in IMAGE_TASKS) != (modality == "image"):
        raise ValueError(f"--task {args.task} does not fit {args.index}, an index of a {modality} corpus: "
                         f"use {'one of ' + ', '.join(IMAGE_TASKS) if modality == 'image' else 'text'}, or leave "
                         "--task out")
    formats = [f.strip() for f in args.format.split(",") if f.strip()] if args.format else list(FORMATS)
    if args.benchmark:
        from ..datasets import load_benchmark

        if not args.root:
            raise ValueError("--benchmark needs --root (the release folder)")
        benchmark = load_benchmark(args.benchmark, args.root, split=args.split, **_loader_args(args.loader_arg))
        queries = queries_from_benchmark(benchmark, images=args.images is not False)
        split, data_source = benchmark.split, args.data_source or f"grape_{args.benchmark}"
    else:
        queries = read_queries_jsonl(args.queries, task=args.task or default_task(modality), language=args.language,
                                     split=args.split)
        split, data_source = args.split, args.data_source or "grape"
    if modality is not None:
        queries = tasks_for_modality(queries, modality)
    queries, dropped = with_targets(queries)
    if args.limit is not None:
        queries = queries[: args.limit]
    summary = write_training_data(queries, args.out, split=split, formats=formats, images=args.images,
                                  system=not args.no_system, data_source=data_source, dropped=dropped)
    print(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prepare`` sub-command to the ``grape-rewards`` parser."""
    p = sub.add_parser("prepare", help="write OpenRLHF / verl / TRL training files for a benchmark split",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--benchmark", help="a benchmark loader: cirr, flickr30k-cn, cvlue, xm3600, wiki-longform")
    src.add_argument("--queries", help="a JSONL of queries: query_id, text, target_ids [, task, language, "
                                       "reference_id, reference_image, split]")
    p.add_argument("--root", help="--benchmark: the release folder")
    p.add_argument("--loader-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra loader argument, e.g. image_root=/data/cirr/img_raw (repeatable)")
    p.add_argument("--split", default="train", help="the split to write (default train)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", help="comma-separated subset of openrlhf,verl,trl (default: all)")
    p.add_argument("--images", action=argparse.BooleanOptionalAction, default=None,
                   help="show the reference image to the policy (VLM rows; default: when every query has one)")
    p.add_argument("--no-system", action="store_true",
                   help="fold the system message into the user turn (chat templates without a system role)")
    p.add_argument("--task", choices=["multilingual", "longform", "composed", "text"],
                   help="--queries: rows' default task (text: a text retriever's corpus; default: from --index)")
    p.add_argument("--index", help="the index the rewards rank: its corpus modality picks the prompts (a text "
                                   "corpus: the text task, for every query)")
    p.add_argument("--language", help="--queries: rows' default language code (zh, ja ...)")
    p.add_argument("--data-source", help="verl data_source / OpenRLHF datasource (default grape_<benchmark>)")
    p.add_argument("--limit", type=int, help="write at most this many queries")
    p.set_defaults(func=cmd_prepare)
