"""``grape-rewards reward-bench``: which reward prefers the rewrites that really retrieve better?

    grape-rewards reward-bench --demo --out results/reward-bench-demo
    grape-rewards reward-bench --index index/ --queries queries.jsonl --candidates candidates.jsonl \\
        --judge bm25 --corpus captions.jsonl --judge other_index/ --out results/reward-bench
    grape-rewards reward-bench --index index/ --queries queries.jsonl --sample 16 --model ~/models/Qwen2.5-1.5B \\
        --save-candidates candidates.jsonl --judge bm25 --corpus captions.jsonl --out results/reward-bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Which reward prefers the rewrites that really retrieve better? Every reward (--reward) scores the candidate rewrites
of each query on the training index; judges the rewards never see (BM25 over the corpus texts, another index over
the same ids, ground-truth labels) then say how well the candidate each reward picks retrieves its target.

Most runs need three flags:
  --index DIR          the training index (its retriever scores the rewards)
  --queries FILE       JSONL: query_id, query, target_ids (candidates may be given inline)
  --candidates FILE    JSONL: query_id, rewrite, kind (or --sample N to generate them with --model)

Try it on the embedded demo corpus (under a minute on a CPU):
  grape-rewards reward-bench --demo --out reward-bench-demo
"""


def parse_judge(text: str) -> tuple[str, str]:
    """``[NAME=]SPEC`` -> (NAME, SPEC); SPEC is ``bm25``, ``labels:FILE`` or an index folder.

    >>> parse_judge("bm25"), parse_judge("mpnet=indexes/mpnet"), parse_judge("truth=labels:gt.jsonl")
    (('bm25', 'bm25'), ('mpnet', 'indexes/mpnet'), ('truth', 'labels:gt.jsonl'))
    """
    name, sep, spec = text.partition("=")
    if sep and spec and not Path(text).exists():
        return name, spec
    if text.startswith("labels:"):
        return Path(text[len("labels:"):]).stem, text
    return (text if text == "bm25" else Path(text).name or text), text


def corpus_texts(index_dir: Path, corpus: Path | None) -> dict[str, str]:
    """The corpus texts BM25 reads: ``--corpus`` (a JSONL/CSV of id + text), else the texts the index keeps (text
    indexes built by this version), else the source file the index was built from, when it still exists."""
    from ..corpus import CorpusIndex, read_manifest, read_source

    if corpus is None:
        index = CorpusIndex.load(index_dir)
        if index.contents_kind == "text":
            return dict(zip(index.ids, index.contents(index.ids)))
        origin = str(read_manifest(index_dir).get("source", {}).get("origin", ""))
        if not origin or not Path(origin).is_file():
            raise ValueError(f"the BM25 judge needs the corpus texts, and {index_dir} keeps none: pass --corpus FILE "
                             "(the JSONL of id and text the index was built from)")
        corpus = Path(origin)
    source = read_source(corpus)
    if source.modality != "text":
        raise ValueError(f"the BM25 judge reads texts; {corpus} is a corpus of images: judge with another index "
                         "(--judge DIR) instead")
    return dict(zip(source.ids, source.items))


def build_judges(specs: Sequence[str], index_dir: Path, corpus: Path | None, device: str) -> list[Any]:
    """The judges of ``--judge`` specs, each checked to rank the training index's ids."""
    from ..corpus.index import IDS, read_ids, read_manifest
    from .judges import BM25Judge, IndexJudge, LabelJudge

    fingerprint = read_manifest(index_dir).get("retriever", {}).get("fingerprint")
    ids = read_ids(index_dir / IDS)
    judges = []
    names: set[str] = set()
    for text in specs:
        name, spec = parse_judge(text)
        if name in names:
            raise ValueError(f"two judges are named {name!r}: name them, e.g. --judge other={spec}")
        names.add(name)
        if spec == "bm25":
            judges.append(BM25Judge(name, corpus_texts(index_dir, corpus), ids))
        elif spec.startswith("labels:"):
            judges.append(LabelJudge.from_file(name, spec[len("labels:"):]))
        elif Path(spec).is_dir():
            judges.append(IndexJudge(name, spec, ids, fingerprint, device=device))
        else:
            raise ValueError(f"--judge {text!r}: not bm25, labels:FILE, or an index folder")
    return judges


def sample_candidates(queries: Sequence[Any], args: argparse.Namespace) -> list[Any]:
    """``--sample N`` rewrites of every query by ``--model`` (the rewrite command's backends), kind ``sampled``."""
    from tqdm.auto import tqdm

    from ..rewards.format import extract_rewrite
    from ..rewrite.backends import BackendOptions, GenerationRequest, SamplingConfig, create_generator
    from ..rewrite.prompts import build_messages
    from .reward_bench_data import BenchCandidate

    if args.sample < 2:
        raise ValueError(f"--sample {args.sample}: a reward can only pick among two or more rewrites per query")
    if not args.model:
        raise ValueError("--sample needs --model (a local model folder, a hub name, or the served model's name)")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    generator = create_generator(args.backend, args.model, BackendOptions(sampling=sampling, device=args.device,
                                                                          base_url=args.base_url))
    out = []
    try:
        for q in tqdm(queries, desc="sample", unit="query", disable=args.quiet):
            request = GenerationRequest(build_messages(args.task, q.query))
            for raw in generator.generate([request] * args.sample):
                extraction = extract_rewrite(raw)
                out.append(BenchCandidate(q.query_id, extraction.text if extraction.scorable else "", "sampled"))
    finally:
        generator.close()
    return out


@contextlib.contextmanager
def demo_inputs(args: argparse.Namespace) -> Iterator[tuple[Path, Path, Path]]:
    """The demo's index (built into a temporary folder, removed afterwards), queries and corpus."""
    from ..demo_data import DEFAULT_RETRIEVER, built_demo_index, data_path
    from ..retrievers import create_retriever

    retriever = create_retriever(DEFAULT_RETRIEVER, device=args.device)
    with built_demo_index(retriever) as index_dir:
        yield index_dir, data_path("reward_bench.jsonl"), data_path("captions.jsonl")


def cmd_reward_bench(args: argparse.Namespace) -> int:
    from .reward_bench import DEFAULT_REWARDS, parse_reward, run_reward_bench, score_candidates
    from .reward_bench_data import group_candidates, read_bench_queries, read_candidates, write_candidates
    from .reward_bench_report import write_reward_bench

    start = time.perf_counter()
    with demo_inputs(args) if args.demo else contextlib.nullcontext(None) as demo:
        if demo is not None:
            index_dir, queries_file, corpus = demo
            judges_specs = args.judge or ["bm25"]
        else:
            if args.index is None or args.queries is None:
                raise ValueError("give --index and --queries (or --demo)")
            index_dir, queries_file, corpus, judges_specs = args.index, args.queries, args.corpus, args.judge
            if not judges_specs:
                raise ValueError("no judge: add --judge bm25 (BM25 over the corpus texts), --judge INDEX_DIR (another "
                                 "retriever over the same ids) or --judge labels:FILE (ground truth)")
        rewards = dict(parse_reward(r) for r in (args.reward or DEFAULT_REWARDS))
        baseline = args.baseline
        if baseline not in rewards:
            baseline_name, config = parse_reward(baseline)
            rewards = {baseline_name: config, **rewards}
        # Every input is read and checked before any model loads.
        queries, candidates = read_bench_queries(queries_file)
        by_id = {q.query_id: q for q in queries}
        for path in args.candidates:
            candidates += read_candidates(path, by_id)
        if args.sample:
            candidates += sample_candidates(queries, args)
            if args.save_candidates:
                write_candidates(args.save_candidates, candidates)
        if not candidates:
            raise ValueError("no candidates: give --candidates FILE, candidates inline in --queries, or --sample N")
        group_candidates(queries, candidates)
        pools = {"all": None}
        for item in args.pool:
            name, _, kinds = item.partition("=")
            if not name or not kinds:
                raise ValueError(f"--pool {item!r}: expected NAME=KIND[,KIND...]")
            pools[name] = kinds.split(",")
        judges = build_judges(judges_specs, Path(index_dir), corpus, args.device)
        values, info = score_candidates(index_dir, rewards, by_id, candidates, device=args.device,
                                        progress=not args.quiet)
        result = run_reward_bench(queries, candidates, values, judges, pools=pools, baseline=baseline,
                                  confidence=args.confidence, resamples=args.resamples, progress=not args.quiet)
    result.summary["inputs"] = {**info, "index": "the demo captions" if args.demo else str(index_dir),
                                "queries": len(queries), "candidates": len(candidates),
                                "kinds": dict(Counter(c.kind for c in candidates))}
    result.summary["rewards"] = {name: config.model_dump(exclude={"alarms"}) for name, config in rewards.items()}
    result.summary["command"] = "grape-rewards " + " ".join(sys.argv[1:]) if args.record_command else None
    result.summary["seconds"] = round(time.perf_counter() - start, 1)
    files = write_reward_bench(result, args.out, plot_png=not args.no_plot)
    print(Path(files["md"]).read_text(encoding="utf-8"))
    print(json.dumps(files, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add ``reward-bench`` to the sub-commands."""
    p = subparsers.add_parser("reward-bench", help="which reward picks the rewrites that retrieve better, judged by "
                                                   "retrievers (and ground truth) the rewards never see",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    main = p.add_argument_group("what to compare")
    main.add_argument("--index", type=Path, help="the training index (its retriever scores the rewards)")
    main.add_argument("--queries", type=Path, help="JSONL of queries: query_id, query, target_ids, and optionally "
                                                   "excluded_ids, reference_id, group (a seed), candidates")
    main.add_argument("--candidates", type=Path, action="append", default=[],
                      help="JSONL of candidate rewrites: query_id, rewrite, kind; repeatable")
    main.add_argument("--out", type=Path, required=True, help="folder for reward-bench.json/.md/.png, picks.jsonl, "
                                                              "scored.jsonl")
    main.add_argument("--demo", action="store_true", help="run on the embedded demo corpus and its shipped "
                                                          "candidates (MiniLM rewards, BM25 judge)")
    rw = p.add_argument_group("rewards and judges")
    rw.add_argument("--reward", action="append", metavar="REWARD",
                    help="a reward to compare: similarity, default, a YAML file of reward settings, or "
                         "[relative-][margin-|soft-]SHAPE[:field=value,...] with SHAPE linear, reciprocal, log, "
                         "loglinear or recall@K; repeatable (default: the baseline, every rank shape, margin and soft)")
    rw.add_argument("--baseline", default="similarity", help="the reward the others are compared with (default "
                                                             "similarity)")
    rw.add_argument("--judge", action="append", default=[], metavar="[NAME=]JUDGE",
                    help="bm25 (BM25 over the corpus texts), an index folder over the same ids (its own retriever), "
                         "or labels:FILE (ground truth: query_id, rewrite, correct); repeatable")
    rw.add_argument("--corpus", type=Path, help="the corpus texts for BM25 (default: the texts the index keeps, "
                                                "or the file it was built from)")
    rw.add_argument("--pool", action="append", default=[], metavar="NAME=KIND[,KIND]",
                    help="also report picks among candidates of these kinds only, e.g. sampled=sampled; repeatable")
    st = p.add_argument_group("statistics")
    st.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    st.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    sm = p.add_argument_group("sampling candidates (instead of, or besides, --candidates)")
    sm.add_argument("--sample", type=int, default=0, metavar="N", help="sample N rewrites of every query")
    sm.add_argument("--model", help="the rewriting model: a local folder, a hub name, or a served model's name")
    sm.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "openai"],
                    help="how to run the model (default transformers; openai: a served model at --base-url)")
    sm.add_argument("--base-url", help="the openai backend's server, e.g. http://localhost:8000/v1")
    sm.add_argument("--task", default="text", choices=["multilingual", "longform", "composed", "text"],
                    help="the rewrite prompt (default text)")
    sm.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    sm.add_argument("--max-new-tokens", type=int, default=64, help="longest completion in tokens (default 64)")
    sm.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sm.add_argument("--save-candidates", type=Path, help="write the candidates (sampled ones included) here, so the "
                                                         "run can be repeated with --candidates")
    other = p.add_argument_group("other")
    other.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    other.add_argument("--no-plot", action="store_true", help="skip the png (made only with matplotlib)")
    other.add_argument("--quiet", action="store_true", help="no progress bars")
    other.add_argument("--record-command", action=argparse.BooleanOptionalAction, default=True,
                       help="write the command line into the results (default on)")
    p.set_defaults(func=cmd_reward_bench)
