"""``grape-rewards eval`` (Recall@K of original queries and rewrite files, the score-inflation report, CIRR
submissions), ``grape-rewards inflation-report`` (the report from scored JSONL files alone),
``grape-rewards series-report`` (the dashboard's reward series as a PNG, from a scored JSONL), and
``grape-rewards rewrite`` (registered from :mod:`grape_rewards.rewrite.cli`).

    grape-rewards eval --benchmark flickr30k-cn --root data/flickr30k-cn --retriever open_clip:ViT-L-14/openai \\
        --rewrites base=rewrites/base.jsonl --rewrites grape=rewrites/grape.jsonl --out results/flickr
    grape-rewards eval --benchmark cirr --root data/cirr --split test1 --retriever composed:open_clip:ViT-L-14/openai \\
        --rewrites grape=rewrites/cirr_test.jsonl --out results/cirr_test      # submissions only

With several ``--index`` (an ensemble: each index's own retriever, over the same corpus ids in any order), every
retriever is evaluated over its own index and the report leads with the ensemble's combined Recall@K
(``--ensemble mean``: the mean of the retrievers' R@K; ``min``: the share of queries whose target is in the top K
of every retriever; the rule the ensemble reward combines rank parts by, on the recall@K shape), then one table
per retriever. metrics.json keeps its keys (``methods`` then holds the combined metrics) and adds ``ensemble``
(``rule``, ``combined``, and per retriever its ``retriever``, ``index`` and ``methods``); the inflation report
has one distribution per retriever and method, and per_query.jsonl adds ``retriever_<j>_rank``. CIRR submission
files need one ranking, so they are refused for an ensemble.

    grape-rewards eval --benchmark flickr30k-cn --root data/flickr30k-cn --index indexes/vitl14 \\
        --index indexes/siglip --ensemble min --rewrites grape=rewrites/grape.jsonl --out results/flickr-ensemble

A CIRR submission the server would not take (a gallery under 51 images has no top 50 besides each reference)
is refused on its own: the metrics are still written and printed, the reason goes to stderr, and the exit code
is 1, since files that were asked for (``--write-submissions``, or the test split's only output) are missing.

Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EVAL_DESCRIPTION = """\
Recall@K of a benchmark split's original queries and of each rewrite file, side by side (metrics.json and .md),
and the score-inflation report (similarity to the target against the best and the average non-target).

  grape-rewards eval --benchmark flickr30k-cn --root data/flickr30k-cn --retriever open_clip:ViT-L-14/openai \\
      --rewrites base=rewrites/base.jsonl --rewrites grape=rewrites/grape.jsonl --out results/flickr
  grape-rewards eval --benchmark cirr --root data/cirr --split test1 --retriever composed:open_clip:ViT-L-14/openai \\
      --rewrites grape=rewrites/cirr_test.jsonl --out results/cirr_test      # CIRR test1: the submission files

Several --index (each built by its own retriever over the same corpus ids) make an ensemble: each retriever is
evaluated over its own index, and the report leads with the combined Recall@K (--ensemble mean: the mean of the
retrievers' R@K; min: the share of queries whose target is in the top K of every retriever), then one table per
retriever. CIRR submission files need one ranking, so an ensemble does not write them.

A CIRR submission the server would not take (a gallery under 51 images has no top 50 besides each reference) is
refused on its own: the metrics are still written, the reason is printed, and the exit code is 1.
"""

def _named_paths(items: list[str]) -> list[tuple[str | None, Path]]:
    from .evaluate import parse_named_path

    return [parse_named_path(item) for item in items]


def cmd_eval(args: argparse.Namespace) -> int:
    from ..cli_args import retriever_from_args
    from ..corpus.index import read_manifest
    from ..ensemble import check_ensemble_request
    from ..retrievers.composed import ComposedRetriever
    from ..rewrite.cli import benchmark_from_args
    from .evaluate import (
        RewriteSet,
        check_ensemble_benchmark,
        evaluate,
        evaluate_ensemble,
        prepare_index,
        write_eval_outputs,
    )
    from .inflation_report import from_scored_jsonl

    # Read every input before the (slow) model and corpus work, so a wrong path fails at once.
    rewrite_sets = [RewriteSet.from_file(path, name) for name, path in _named_paths(args.rewrites)]
    extra = [from_scored_jsonl(path, name) for name, path in _named_paths(args.scored)]
    benchmark = benchmark_from_args(args)
    index_dirs: list[str | None] = list(args.index or [None])  # None: build the index (--save-index or a temp dir)
    if args.index:
        check_ensemble_request(args.index, args.retriever)  # several: each index's own retriever
        if len(args.index) > 1:
            check_ensemble_benchmark(benchmark, args.write_submissions)
    elif args.retriever is None:
        raise ValueError("--retriever is required unless --index names a prebuilt index")
    specs = [args.retriever] if args.retriever else [read_manifest(path)["retriever"]["spec"] for path in args.index]
    members = []
    for spec, index_dir in zip(specs, index_dirs):
        retriever = retriever_from_args(args, spec)
        if benchmark.task == "composed" and not isinstance(retriever, ComposedRetriever):
            # Composed queries fuse the reference image: wrap the CLIP retriever (same corpus embeddings).
            retriever = ComposedRetriever(retriever, fusion=args.fusion, image_weight=args.image_weight)
        index = prepare_index(benchmark, retriever, index_dir=index_dir, save_dir=args.save_index,
                              batch_size=args.corpus_batch_size, num_workers=args.num_workers,
                              progress=not args.quiet)
        members.append((retriever, index))
    if len(members) > 1:
        report = evaluate_ensemble(benchmark, members, rewrite_sets, rule=args.ensemble or "mean",
                                   batch_size=args.batch_size, limit=args.limit, submissions=args.write_submissions,
                                   progress=not args.quiet)
    else:
        retriever, index = members[0]
        report = evaluate(benchmark, retriever, index, rewrite_sets, batch_size=args.batch_size, limit=args.limit,
                          submissions=args.write_submissions, progress=not args.quiet)
    files = write_eval_outputs(report, args.out, per_query=args.per_query, extra_distributions=extra,
                               plot=not args.no_plot)
    print(report.to_markdown())
    print(json.dumps(files, indent=2))
    refused = files.get("submissions_refused", {})
    for reason in refused.values():
        print(f"grape-rewards eval: {reason}", file=sys.stderr)
    if refused:
        print(f"grape-rewards eval: the metrics were written to {args.out}; {len(refused)} submission(s) were "
              "refused (exit code 1)", file=sys.stderr)
        return 1
    return 0


def cmd_inflation_report(args: argparse.Namespace) -> int:
    from .inflation_report import from_scored_jsonl, write_inflation_report

    dists = [from_scored_jsonl(path, name) for name, path in _named_paths(args.scored)]
    result = write_inflation_report(dists, args.out, prefix=args.prefix, title=args.title, plot=not args.no_plot)
    print(Path(result["files"]["md"]).read_text(encoding="utf-8"))
    print(json.dumps(result["files"], indent=2))
    return 0


def cmd_series_report(args: argparse.Namespace) -> int:
    from .series_report import write_series_report

    print(json.dumps(write_series_report(args.scored, args.out, window=args.window, title=args.title), indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add ``eval``, ``inflation-report`` and ``series-report`` to the sub-commands."""
    from ..cli_args import IndexListAction, add_retriever_args
    from ..rewrite.cli import add_benchmark_args

    p = subparsers.add_parser("eval", help="Recall@K of original queries and rewrite files; inflation report; "
                                           "CIRR submissions", description=EVAL_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(p)
    add_retriever_args(p, required=False)
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json/.md, inflation.json/.md/.png, "
                                                           "submissions/")
    p.add_argument("--rewrites", action="append", default=[], metavar="[NAME=]PATH",
                   help="a rewrites JSONL (grape-rewards rewrite); NAME labels it (default: the file name); "
                        "repeatable")
    p.add_argument("--scored", action="append", default=[], metavar="[NAME=]PATH",
                   help="a scored JSONL (grape-rewards score) added to the inflation report only, e.g. rewrites "
                        "scored under another reward; repeatable")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--index", action=IndexListAction,
                   help="a prebuilt index of the benchmark's corpus (fingerprint checked); several (comma-separated or "
                        "--index repeated) for an ensemble of the indexes' own retrievers over the same ids (no "
                        "--retriever): Recall@K per retriever and combined (--ensemble)")
    g.add_argument("--save-index", type=Path,
                   help="build the corpus index here (or reuse the one already built here from the same corpus)")
    p.add_argument("--ensemble", choices=["mean", "min"],
                   help="several --index: the combined R@K is the mean over the queries of the mean (default: the "
                        "mean of the retrievers' R@K) or the minimum (the share of queries in the top K of every "
                        "retriever) of the retrievers' hits, as the ensemble reward combines rank parts")
    p.add_argument("--batch-size", type=int, default=256, help="queries per encoding batch")
    p.add_argument("--corpus-batch-size", type=int, default=64, help="corpus items per encoding batch")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--limit", type=int, help="only the first N labelled queries (a quick look)")
    p.add_argument("--write-submissions", action="store_true",
                   help="CIRR: also write the server's submission files on a labelled split (always on test1); "
                        "one the server would not take is refused with its reason (metrics still written, exit 1)")
    p.add_argument("--per-query", action="store_true", help="also write per_query.jsonl")
    p.add_argument("--no-plot", action="store_true", help="skip inflation.png (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("inflation-report", help="score-inflation report from scored JSONL files",
                              description="The score-inflation report (similarity to the target against the best and "
                                          "the average non-target, per file) from scored JSONL files: .json, .md and "
                                          "a .png.")
    p.add_argument("--scored", action="append", required=True, metavar="[NAME=]PATH",
                   help="a scored JSONL (grape-rewards score output); NAME labels it; repeatable")
    p.add_argument("--out", required=True, type=Path, help="the folder to write the report into")
    p.add_argument("--prefix", default="inflation", help="file name stem of the outputs (default inflation)")
    p.add_argument("--title", help="the plot's title")
    p.add_argument("--no-plot", action="store_true", help="skip the .png (no matplotlib needed)")
    p.set_defaults(func=cmd_inflation_report)

    p = subparsers.add_parser("series-report", help="the dashboard's reward series (reward, rank, recall, similarities,"
                                                    " margin, length, alarms) as a PNG from a scored JSONL",
                              description="The dashboard's series (reward, rank, recall, similarities, margin, length, "
                                          "alarms) over a scored JSONL whose rows are in the order they were scored, "
                                          "as one PNG, with the window means beside it as JSON.")
    p.add_argument("--scored", required=True, type=Path, help="a scored JSONL (grape-rewards score), rows in order")
    p.add_argument("--out", required=True, type=Path, help="the PNG to write (the window means go beside it as .json)")
    p.add_argument("--window", type=int, default=256, help="rows per plotted point (default 256)")
    p.add_argument("--title", help="the figure's title")
    p.set_defaults(func=cmd_series_report)
