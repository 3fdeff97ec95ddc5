"""``grape-rewards rewrite``: generate rewrites of a benchmark split's queries into a resumable JSONL file.

    grape-rewards rewrite --benchmark flickr30k-cn --root data/flickr30k-cn --split test \\
        --backend transformers --model Qwen/Qwen2.5-1.5B-Instruct --out rewrites/base.jsonl
    grape-rewards rewrite --benchmark cirr --root data/cirr --split val --backend openai \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct --out rewrites/vl.jsonl

Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Generate rewrites of a benchmark split's queries with an LLM (transformers, vLLM, or any OpenAI-compatible server)
into a JSONL file; rerun the same command after an interruption and the queries already written are skipped.

  grape-rewards rewrite --benchmark flickr30k-cn --root data/flickr30k-cn --split test \\
      --backend transformers --model Qwen/Qwen2.5-1.5B-Instruct --out rewrites/base.jsonl
  grape-rewards rewrite --benchmark cirr --root data/cirr --split val --backend openai \\
      --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct --out rewrites/vl.jsonl
"""


def add_benchmark_args(p: argparse.ArgumentParser) -> None:
    """``--benchmark``, ``--root``, ``--split``, ``--bench-arg`` (shared by ``rewrite`` and ``eval``)."""
    p.add_argument("--benchmark", required=True,
                   help="benchmark name: flickr30k-cn, cvlue, xm3600, wiki-longform or cirr")
    p.add_argument("--root", required=True, type=Path, help="the benchmark's release folder")
    p.add_argument("--split", help="split (default: the benchmark's evaluation split)")
    p.add_argument("--bench-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a loader keyword, e.g. language=en (XM3600) or image_root=/data/nlvr2 (CIRR); "
                        "values are read as JSON when they parse, else as strings; repeatable")


def parse_bench_args(items: list[str]) -> dict[str, Any]:
    """``["language=en", "check_images=false"]`` -> ``{"language": "en", "check_images": False}``.

    >>> parse_bench_args(["language=en", "check_images=false", "image_root=/data/x"])
    {'language': 'en', 'check_images': False, 'image_root': '/data/x'}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--bench-arg {item!r}: expected KEY=VALUE with KEY a loader keyword")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def benchmark_from_args(args: argparse.Namespace) -> Any:
    from ..datasets import load_benchmark

    try:
        return load_benchmark(args.benchmark, args.root, args.split, **parse_bench_args(args.bench_arg))
    except TypeError as exc:  # an unknown loader keyword
        raise ValueError(f"benchmark {args.benchmark!r}: {exc}") from None


def cmd_rewrite(args: argparse.Namespace) -> int:
    from .backends import BackendOptions, SamplingConfig, create_generator
    from .runner import generate_rewrites, reference_images

    benchmark = benchmark_from_args(args)
    with_images = args.images if args.images is not None else benchmark.task == "composed"
    if with_images and benchmark.task != "composed":
        raise ValueError(f"--images: {args.benchmark} queries have no reference image (only composed tasks do)")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed if args.seed >= 0 else None)
    options = BackendOptions(sampling=sampling, device=args.device, dtype=args.dtype, vision=with_images,
                             trust_remote_code=args.trust_remote_code, base_url=args.base_url,
                             api_key=args.api_key or os.environ.get(args.api_key_env) or None,
                             concurrency=args.concurrency, timeout=args.timeout, model_name=args.model_name,
                             engine_kwargs=json.loads(args.vllm_args) if args.vllm_args else {})
    images = reference_images(benchmark) if with_images else None
    generator = create_generator(args.backend, args.model, options)
    try:
        batch_size = args.batch_size or {"openai": 4 * args.concurrency, "vllm": 256}.get(args.backend, 16)
        summary = generate_rewrites(benchmark.queries(), generator, args.out, images=images, task=args.task,
                                    batch_size=batch_size, limit=args.limit, progress=not args.quiet)
    finally:
        generator.close()
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add ``rewrite`` to the ``grape-rewards`` sub-commands."""
    p = subparsers.add_parser("rewrite", help="generate rewrites of a benchmark's queries (resumable JSONL)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(p)
    p.add_argument("--out", required=True, type=Path,
                   help="JSONL of {query_id, rewrite, raw, model}; ids already in it are skipped (resume)")
    p.add_argument("--backend", choices=["transformers", "vllm", "openai"], default="transformers",
                   help="what runs the LLM: transformers (default), vllm, or openai (any OpenAI-compatible server)")
    p.add_argument("--model", required=True, help="model name or folder (transformers, vllm) or served model name "
                                                  "(openai)")
    p.add_argument("--model-name", help="what the 'model' field records (default: --model)")
    p.add_argument("--task", choices=["multilingual", "longform", "composed", "text"],
                   help="prompt template (default: each query's task; text: for a text retriever's corpus)")
    p.add_argument("--images", dest="images", action="store_true", default=None,
                   help="attach the reference image (composed tasks; the default there): needs a vision-language "
                        "model")
    p.add_argument("--no-images", dest="images", action="store_false", help="text-only prompts, also for CIRR")
    p.add_argument("--batch-size", type=int, help="prompts per generate call and per fsynced write (default: "
                                                  "transformers 16, vllm 256, openai 4 x concurrency)")
    p.add_argument("--limit", type=int, help="only the first N queries")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per rewrite at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (negative: none, not sent to servers)")
    g = p.add_argument_group("transformers")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="model precision (auto: bf16 on GPUs that support it, else fp16; fp32 on the CPU)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the model folder's own Python code (models that need it; only for code you trust)")
    g = p.add_argument_group("vllm")
    g.add_argument("--vllm-args", help='JSON of vllm.LLM keywords, e.g. \'{"tensor_parallel_size": 2}\'')
    g = p.add_argument_group("openai (any OpenAI-compatible server)")
    g.add_argument("--base-url", help="e.g. http://localhost:8000/v1")
    g.add_argument("--api-key", help="bearer token (default: the variable named by --api-key-env)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_rewrite)
