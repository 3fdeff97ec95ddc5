"""Training rows for each framework, from the common query schema and the rewrite prompt templates.

One :class:`TrainingQuery` (query id, text, target ids, optional reference image, split, task, language) becomes:

- OpenRLHF (JSONL): ``{"prompt": [chat messages], "label": "<label JSON>", "images": [path], "datasource": ...}``
  for ``--data.input_key prompt --data.label_key label --data.apply_chat_template [--data.image_key images]``;
- verl (parquet): ``{"data_source", "prompt", "ability", "reward_model": {"style": "rule", "ground_truth":
  "<label JSON>"}, "extra_info": {...}, "images": [path]}``;
- TRL (JSONL): ``{"prompt": [chat messages], "grape_label": "<label JSON>", "target_ids": [...], "query_id",
  "images": [path]}``.

The prompt is :func:`grape_rewards.rewrite.prompts.build_messages` of the query's task (the same one evaluation
uses), which asks for the rewrite between ``<answer>`` tags, as the format reward reads it. For OpenRLHF and
verl an image is an ``<image>`` placeholder in the user text (both frameworks expand it, one placeholder per
entry of ``images``), so every message content stays a string. The label is a JSON string (the label schema
of :mod:`grape_rewards.labels`), which passes through every ``datasets`` version unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..datasets.schema import IMAGE_TASKS, TASKS, Query

ABILITY = "query_rewrite"
"""verl's ``ability`` column."""
IMAGE_PLACEHOLDER = "<image>"
TRL_LABEL_COLUMN = "grape_label"
"""The TRL dataset's label column (TRL's data utilities treat a ``label`` column as a KTO preference label)."""


@dataclass(frozen=True)
class TrainingQuery:
    """One query to train on: the common schema plus the reference image's file (when it has one)."""

    query_id: str
    text: str
    target_ids: tuple[str, ...]
    task: str = "multilingual"
    language: str | None = None
    reference_id: str | None = None
    reference_image: str | None = None
    """Path of the reference image (composed retrieval); the policy sees it when images are on."""
    split: str | None = None
    excluded_ids: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"query {self.query_id!r}: task must be one of {TASKS}, got {self.task!r}")
        if not self.text or not self.text.strip():
            raise ValueError(f"query {self.query_id!r}: empty query text")

    @classmethod
    def from_query(cls, query: Query, images: Mapping[str, str] | None = None) -> TrainingQuery:
        """From a benchmark loader's :class:`~grape_rewards.datasets.Query` (``images``: corpus id -> path)."""
        image = images.get(query.reference_id) if images is not None and query.reference_id else None
        if image is not None:
            image = os.path.abspath(image)  # training may run from another folder than this
        return cls(query_id=query.query_id, text=query.text, target_ids=tuple(query.target_ids), task=query.task,
                   language=query.language, reference_id=query.reference_id, reference_image=image, split=query.split)


def label(query: TrainingQuery) -> dict[str, Any]:
    """The label object (:mod:`grape_rewards.labels` schema); the query text rides along for the relative mode.

    >>> label(TrainingQuery("q1", "一只狗", ("img_1",), language="zh"))
    {'target_ids': ['img_1'], 'query_id': 'q1', 'original_query': '一只狗'}
    """
    out: dict[str, Any] = {"target_ids": list(query.target_ids)}
    if query.reference_id is not None:
        out["reference_id"] = query.reference_id
    if query.excluded_ids:
        out["excluded_ids"] = list(query.excluded_ids)
    out["query_id"] = query.query_id
    out["original_query"] = query.text
    return out


def label_json(query: TrainingQuery) -> str:
    """:func:`label` as a JSON string (UTF-8 kept as is)."""
    return json.dumps(label(query), ensure_ascii=False)


def chat_messages(query: TrainingQuery, with_image: bool = False, system: bool = True,
                  image_token: str = IMAGE_PLACEHOLDER) -> list[dict[str, Any]]:
    """The task's rewrite prompt as chat messages whose contents are all strings.

    Args:
        with_image: the reference image is shown to the policy (the query must have one): the user text says so,
            and the image sits where ``image_token`` is (``<image>``: OpenRLHF and verl expand it; ``""``: left
            out, for TRL, which puts the row's ``images`` before the first user text itself).
        system: keep the system message (else it is folded into the user message, for chat templates without a
            system role).
    """
    from ..rewrite.prompts import build_messages, merge_system_message

    if with_image and not query.reference_image:
        raise ValueError(f"query {query.query_id!r} has no reference image to show")
    messages = build_messages(query.task, query.text, language=query.language, with_image=with_image)
    if not system:
        messages = merge_system_message(messages)
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(image_token if part.get("type") == "image" else part.get("text", "")
                              for part in content)
        out.append({"role": message["role"], "content": content})
    return out


def openrlhf_row(query: TrainingQuery, with_image: bool = False, system: bool = True,
                 data_source: str = "grape") -> dict[str, Any]:
    """One OpenRLHF prompt row (``--data.input_key prompt --data.label_key label [--data.image_key images]``)."""
    row: dict[str, Any] = {"prompt": chat_messages(query, with_image, system), "label": label_json(query)}
    if with_image:
        row["images"] = [str(query.reference_image)]
    row["query_id"] = query.query_id
    row["datasource"] = data_source
    return row


def verl_row(query: TrainingQuery, index: int, with_image: bool = False, system: bool = True,
             data_source: str = "grape") -> dict[str, Any]:
    """One verl row (RLHFDataset: ``data_source``, ``prompt``, ``ability``, ``reward_model``, ``extra_info``,
    ``images``)."""
    row: dict[str, Any] = {
        "data_source": data_source,
        "prompt": chat_messages(query, with_image, system),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": label_json(query)},
        "extra_info": {"index": index, "split": query.split or "", "query_id": query.query_id, "task": query.task,
                       "language": query.language or ""},
    }
    if with_image:
        row["images"] = [str(query.reference_image)]
    return row


def trl_row(query: TrainingQuery, with_image: bool = False, system: bool = True) -> dict[str, Any]:
    """One TRL row: conversational ``prompt``, the label in ``grape_label`` (TRL reserves ``label`` for KTO-style
    preference data), ``query_id`` naming the prompt's group, and ``images`` (TRL shows them before the user text)."""
    row: dict[str, Any] = {
        "prompt": chat_messages(query, with_image, system, image_token=""),
        TRL_LABEL_COLUMN: label_json(query),
        "target_ids": list(query.target_ids),
        "query_id": query.query_id,
        "task": query.task,
    }
    if with_image:
        row["images"] = [str(query.reference_image)]
    return row


# -- reading queries ------------------------------------------------------------------------------------------
def read_queries_jsonl(path: str | Path, task: str | None = None, language: str | None = None,
                       split: str | None = None) -> list[TrainingQuery]:
    """Queries in the common schema from a JSONL file; errors name the line.

    Fields: ``query_id`` (or ``id``), ``text`` (or ``query``), ``target_ids`` (a list or one id), and optionally
    ``task``, ``language``, ``reference_id``, ``reference_image`` (a path), ``excluded_ids``, ``split``.
    ``task``/``language`` fill rows that lack them; ``split`` keeps only the rows of that split (rows without one
    are kept).
    """
    from ..datasets.schema import DataFormatError, read_jsonl

    path = Path(path)
    out = []
    for line, row in read_jsonl(path):
        try:
            row_split = row.get("split")
            if split is not None and row_split is not None and row_split != split:
                continue
            targets = row.get("target_ids", [])
            targets = [targets] if isinstance(targets, (str, int)) else targets
            query_id = row.get("query_id", row.get("id"))
            if query_id is None:
                raise ValueError("missing 'query_id'")
            text = row.get("text", row.get("query"))
            if not isinstance(text, str):
                raise ValueError("missing 'text' (the query)")
            row_task = row.get("task") or task
            if row_task is None:
                raise ValueError("no 'task' in the row; pass --task multilingual|longform|composed|text, or "
                                 "--index (a text corpus implies text)")
            image = row.get("reference_image")
            if image is not None and not Path(str(image)).is_absolute():
                image = str((path.parent / str(image)).resolve())
            out.append(TrainingQuery(
                query_id=str(query_id), text=text, target_ids=tuple(str(t) for t in targets), task=row_task,
                language=row.get("language") or language, reference_id=row.get("reference_id"),
                reference_image=image, split=row_split or split,
                excluded_ids=tuple(str(e) for e in row.get("excluded_ids", []))))
        except (ValueError, TypeError) as exc:
            raise DataFormatError(path, str(exc), line=line) from None
    return out


def queries_from_benchmark(benchmark: Any, images: bool = True) -> list[TrainingQuery]:
    """Every query of a benchmark loader, with reference image paths when its queries have references."""
    queries: list[Query] = list(benchmark.queries())
    paths: dict[str, str] | None = None
    if images and any(q.reference_id for q in queries):
        from ..rewrite.runner import reference_images

        paths = reference_images(benchmark)
    return [TrainingQuery.from_query(q, paths) for q in queries]


def index_modality(index_dir: str | Path) -> str:
    """What the corpus of an index folder holds, ``image`` or ``text``, from its manifest (nothing else is loaded)."""
    from ..corpus.index import read_manifest

    manifest = read_manifest(index_dir)
    modality = manifest.get("modality", manifest.get("retriever", {}).get("corpus_modality"))
    if modality not in ("image", "text"):
        raise ValueError(f"{index_dir}: the index manifest records no corpus modality (image or text)")
    return str(modality)


def default_task(modality: str | None) -> str | None:
    """The task of queries that name none, for a corpus of ``modality``: ``text`` for a text corpus, else none
    (an image corpus has three tasks, so it must be chosen).

    >>> default_task("text"), default_task("image"), default_task(None)
    ('text', None, None)
    """
    return "text" if modality == "text" else None


def tasks_for_modality(queries: Iterable[TrainingQuery], modality: str) -> list[TrainingQuery]:
    """The queries with tasks whose prompts fit a corpus of ``modality``.

    On a text corpus, the image tasks' queries (``multilingual``, ``longform``) take the ``text`` task, whose prompt
    asks for a search query for a passage rather than a CLIP caption; a ``composed`` query (a reference image) is
    refused. On an image corpus, a ``text`` query is refused.

    >>> [q.task for q in tasks_for_modality([TrainingQuery("q1", "一只狗", ("c1",), language="zh")], "text")]
    ['text']
    """
    out = []
    for query in queries:
        if modality == "text" and query.task in IMAGE_TASKS:
            if query.task == "composed":
                raise ValueError(f"query {query.query_id!r} is a composed (reference image) query, but the index "
                                 "embeds a text corpus")
            query = dataclasses.replace(query, task="text")
        elif modality == "image" and query.task not in IMAGE_TASKS:
            raise ValueError(f"query {query.query_id!r} has the {query.task!r} task, but the index embeds images: "
                             f"use one of {', '.join(IMAGE_TASKS)}")
        out.append(query)
    return out


def with_targets(queries: Iterable[TrainingQuery]) -> tuple[list[TrainingQuery], int]:
    """The queries that can be rewarded (targets known) and how many were dropped (hidden test labels)."""
    kept, dropped = [], 0
    for query in queries:
        if query.target_ids:
            kept.append(query)
        else:
            dropped += 1
    return kept, dropped
