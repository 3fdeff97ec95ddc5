"""Generate rewrites for a benchmark's queries into a resumable JSONL file."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..datasets.schema import Benchmark, Query
from .backends import GenerationRequest, Generator
from .prompts import build_messages
from .store import RewriteWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewriteSummary:
    """What a :func:`generate_rewrites` run did."""

    output: str
    total: int
    """Queries asked for (after ``limit``)."""
    already_done: int
    """Queries found in the output file from an earlier run, skipped."""
    written: int
    unusable: int
    """Rows written whose completion held no usable rewrite (empty, or an unclosed answer tag); their
    ``rewrite`` is ``""`` and evaluation falls back to the original query."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def reference_images(benchmark: Benchmark) -> dict[str, str]:
    """Corpus id -> image path, for the reference images of composed queries."""
    return {item.id: item.image for item in benchmark.corpus() if item.image is not None}


def make_request(query: Query, image: str | None = None, task: str | None = None) -> GenerationRequest:
    """The generation request of one query (its task's prompt; the image, when given, in the user turn)."""
    messages = build_messages(task or query.task, query.text, language=query.language, with_image=image is not None)
    return GenerationRequest(messages=messages, image=image)


def generate_rewrites(
    queries: Iterable[Query],
    generator: Generator,
    output: str | Path,
    *,
    images: Mapping[str, str] | None = None,
    task: str | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
) -> RewriteSummary:
    """Rewrite every query not yet in ``output``; append one fsynced batch at a time.

    Args:
        queries: the benchmark's queries (each carries its task and language).
        generator: the backend (see :func:`grape_rewards.rewrite.create_generator`).
        output: the JSONL file; rows ``{"query_id", "rewrite", "raw", "model"}``. Ids already there are
            skipped, and a partial last line from an interrupted run is trimmed first.
        images: reference id -> image path: composed queries whose ``reference_id`` is in it get their
            reference image attached (for vision-language models). None: text-only prompts.
        task: override each query's task (its prompt template).
        limit: only the first ``limit`` queries.
    """
    from ..rewards.format import extract_rewrite  # imports torch: kept out of module import

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    selected: list[Query] = []
    for q in queries:
        if limit is not None and len(selected) >= limit:
            break
        selected.append(q)
    written = unusable = 0
    with RewriteWriter(output) as writer:
        pending = [q for q in selected if q.query_id not in writer.done]
        already = len(selected) - len(pending)
        if already:
            logger.info("%s: %d of %d queries already rewritten; resuming", output, already, len(selected))
        bar = tqdm(total=len(selected), initial=already, desc="rewrite", unit="query", disable=not progress)
        try:
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                requests = []
                for q in batch:
                    image = None
                    if images is not None and q.reference_id is not None:
                        if q.reference_id not in images:
                            raise ValueError(f"query {q.query_id}: reference image {q.reference_id!r} is not in the "
                                             "benchmark's corpus")
                        image = images[q.reference_id]
                    requests.append(make_request(q, image, task))
                raws = generator.generate(requests)
                if len(raws) != len(batch):
                    raise RuntimeError(f"the generator returned {len(raws)} completions for {len(batch)} prompts")
                rows = []
                for q, raw in zip(batch, raws):
                    extraction = extract_rewrite(raw)
                    unusable += not extraction.scorable
                    rows.append({"query_id": q.query_id, "rewrite": extraction.text if extraction.scorable else "",
                                 "raw": raw, "model": generator.model_name})
                written += writer.write_batch(rows)
                bar.update(len(batch))
        finally:
            bar.close()
    return RewriteSummary(str(output), len(selected), already, written, unusable)
