"""Wire formats of the service: parsing requests (with 4xx messages that name the problem) and shaping answers.

OpenRLHF (``POST /get_reward``)::

    {"query": [str], "prompts": [str], "labels": [any]}
    -> {"rewards": [float], "scores": [float in [0, 1]], "extra_logs": {name: [float]}}

``query`` is the templated prompt followed by the response, special tokens kept; the response is recovered
by :func:`~grape_rewards.rewards.response_from_query` (the prompt as a prefix, else the text after the
last assistant header: VLM prompts whose image placeholder was expanded). Each label follows the schema of
:mod:`grape_rewards.labels` (``{"target_ids": [...], "reference_id": ..., ...}``, as JSON or a JSON string).

Native (``POST /v1/rewards``)::

    {"items": [{"completion" | "rewrite": str, "target_ids": [str], "excluded_ids": [str],
                "reference_id": str, "query_id": str, "original_query": str}, ...]}
    -> {"results": [{"reward": float, "part_rank": ..., "rank": ..., ...}], "keys": [...], "summary": {...}}

Search-R1 style (``POST /retrieve``)::

    {"queries": [str], "topk": int, "return_scores": bool}
    -> {"result": [[{"document": {"id": str}, "score": float}, ...], ...]}   (documents alone without scores)

Pure functions, no I/O: the app maps :class:`RequestError` to its status code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from ..corpus.index import UnknownIdError
from ..labels import LabelError, parse_label
from ..rewards.config import RewardConfig
from ..rewards.format import extract_rewrite, response_from_query
from ..rewards.inflation import inflation_summary
from ..rewards.shapes import rank_reward
from ..scorer import RewardItem, RewardScorer

try:  # orjson is several times faster on the hot path; json is the fallback
    import orjson

    def loads(data: bytes) -> Any:
        return orjson.loads(data)

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    JSONDecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - orjson is optional
    def loads(data: bytes) -> Any:
        return json.loads(data)

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")

    JSONDecodeError = (json.JSONDecodeError, UnicodeDecodeError)

OPENRLHF_LOG_KEYS: tuple[str, ...] = ("rank", "recall_at_1", "recall_at_5", "recall_at_10", "target_sim", "mean_sim",
                                      "margin", "format_ok", "truncated")
"""Per-sample statistics returned in ``extra_logs`` (OpenRLHF logs the mean of each), plus ``inflation_gap`` and
the keys of :data:`EXTRA_LOG_PREFIXES`."""
EXTRA_LOG_PREFIXES: tuple[str, ...] = ("retriever_", "alarm_")
"""Also in ``extra_logs`` when the samples have them: an ensemble's ``retriever_<j>_rank`` / ``retriever_<j>_part_rank``
and the alarm flags ``alarm_<name>`` (:data:`grape_rewards.alarms.ALARM_KEYS`)."""


class RequestError(ValueError):
    """A request the service cannot score; ``status`` is the HTTP status (400, 413 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_body(body: bytes) -> Any:
    """The JSON of a request body, or a 400 naming the problem.

    >>> parse_body(b'{"a": 1}')
    {'a': 1}
    >>> parse_body(b'{"a": ')
    Traceback (most recent call last):
    ...
    grape_rewards.server.protocol.RequestError: request body is not valid JSON: ...
    """
    if not body.strip():
        raise RequestError(400, "request body is empty: expected a JSON object")
    try:
        return loads(body)
    except JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None


def _object(data: Any, fields: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object with {fields}, got {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _string_list(data: dict[str, Any], name: str, what: str, required: bool = True) -> list[Any] | None:
    value = data.get(name)
    if value is None:
        if required:
            raise RequestError(422, f"missing field {name!r} (a list of {what})")
        return None
    if not isinstance(value, list):
        raise RequestError(422, f"{name!r} must be a list of {what}, got {_kind(value)}")
    return value


def _check_count(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise RequestError(413, f"too many {what} in one request: {n} > max_items_per_request={limit}; "
                                "split the request")


def clip_item(item: RewardItem, config: RewardConfig, max_chars: int) -> RewardItem:
    """Cut a gigantic completion/rewrite to ``max_chars`` after extraction (scoring it is unchanged: it is far
    past the retriever's context length, and it stays ``overlong``); other items are returned as they are."""
    text = item.completion if item.completion is not None else item.rewrite
    if text is None or len(text) <= max_chars:
        return item
    fmt = config.format
    ex = extract_rewrite(text, fmt.answer_tag, fmt.require_answer_tag and item.completion is not None, fmt.max_chars)
    keep = max(max_chars, fmt.max_chars + 1)
    rewrite = ex.text[:keep] if ex.scorable else ""
    return item.model_copy(update={"completion": None, "rewrite": rewrite})


def check_items(items: Sequence[RewardItem], scorer: RewardScorer, where: str) -> None:
    """Refuse (422) an item naming an id the index lacks, or lacking what the reward mode needs.

    ``where`` formats the item's position, e.g. ``"labels[{}]"``.
    """
    relative = scorer.config.relative
    for i, item in enumerate(items):
        try:
            scorer.check_ids([item])
        except UnknownIdError as exc:
            raise RequestError(422, f"{where.format(i)}: {exc}; the training data names an item the index does "
                                    "not hold") from None
        except ValueError as exc:
            raise RequestError(422, f"{where.format(i)}: {exc}") from None
        if relative and not (item.original_query or "").strip():
            raise RequestError(422, f"{where.format(i)}: the relative reward mode needs original_query "
                                    "(in the label) for every sample")


# -- OpenRLHF ---------------------------------------------------------------------------------------------
def parse_openrlhf(data: Any, max_items: int, max_chars: int, config: RewardConfig) -> list[RewardItem]:
    """Items of an OpenRLHF ``/get_reward`` request (validated by hand: this is the hot path).

    >>> items = parse_openrlhf({"query": ["<|im_start|>assistant\\na dog<|im_end|>"], "prompts": [""],
    ...                         "labels": ['{"target_ids": ["c1"]}']}, 10, 20000, RewardConfig())
    >>> items[0].completion, items[0].target_ids
    ('a dog<|im_end|>', ['c1'])
    """
    data = _object(data, "fields 'query', 'prompts' and 'labels'")
    queries = _string_list(data, "query", "strings (templated prompt + response, as OpenRLHF sends them)")
    assert queries is not None
    labels = _string_list(data, "labels", "labels (target ids as JSON, see the label schema)")
    assert labels is not None
    prompts = _string_list(data, "prompts", "strings (the templated prompts)", required=False)
    _check_count(len(queries), max_items, "samples")
    if len(labels) != len(queries):
        raise RequestError(422, f"got {len(queries)} queries but {len(labels)} labels; send one label per query")
    if prompts is not None and len(prompts) != len(queries):
        raise RequestError(422, f"got {len(queries)} queries but {len(prompts)} prompts; send one prompt per query")
    items = []
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise RequestError(422, f"query[{i}] must be a string, got {_kind(query)}")
        prompt = prompts[i] if prompts is not None else None
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError(422, f"prompts[{i}] must be a string, got {_kind(prompt)}")
        try:
            label = parse_label(labels[i])
        except LabelError as exc:
            raise RequestError(422, f"labels[{i}]: {exc}") from None
        item = RewardItem.model_construct(
            completion=response_from_query(query, prompt), rewrite=None, target_ids=label.target_ids,
            excluded_ids=label.excluded_ids, reference_id=label.reference_id, query_id=label.query_id,
            original_query=label.original_query)
        items.append(clip_item(item, config, max_chars))
    return items


def has_rewrite(sample: dict[str, float]) -> bool:
    """Whether a scored sample had a rewrite to retrieve with (empty and missing ones score the penalty)."""
    return sample["format_ok"] == 1.0 or sample["num_tokens"] > 0.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def openrlhf_response(samples: Sequence[dict[str, float]], config: RewardConfig) -> dict[str, Any]:
    """``{"rewards", "scores", "extra_logs"}``; ``scores`` is the rank part in [0, 1] (0 without a rewrite)."""
    rewards = [_finite(s["reward"]) for s in samples]
    scores = [min(1.0, max(0.0, rank_reward(int(s["rank"]), int(s["n"]), config.shape, config.k)))
              if has_rewrite(s) else 0.0 for s in samples]
    logs: dict[str, list[float]] = {key: [_finite(s[key]) for s in samples] for key in OPENRLHF_LOG_KEYS}
    logs["inflation_gap"] = [_finite(s["target_sim"] - s["mean_sim"]) for s in samples]
    if config.relative:
        logs["original_rank"] = [s["original_rank"] for s in samples]
    for key in samples[0] if samples else ():  # an ensemble's per-retriever ranks, the reward-hacking alarm flags
        if key.startswith(EXTRA_LOG_PREFIXES):
            logs[key] = [_finite(s[key]) for s in samples]
    return {"rewards": rewards, "scores": scores, "extra_logs": logs}


# -- native ----------------------------------------------------------------------------------------------
def parse_native(data: Any, max_items: int, max_chars: int, config: RewardConfig) -> list[RewardItem]:
    """Items of a ``/v1/rewards`` request: ``{"items": [...]}`` (a bare list is accepted too)."""
    if isinstance(data, dict):
        if "items" not in data:
            raise RequestError(422, "missing field 'items' (a list of reward items: completion or rewrite, "
                                    "target_ids, and optionally excluded_ids, reference_id, query_id, original_query)")
        unknown = sorted(set(data) - {"items"})
        if unknown:
            raise RequestError(422, f"unknown field(s) {unknown}; expected only 'items'")
        data = data["items"]
    if not isinstance(data, list):
        raise RequestError(422, f"'items' must be a list of reward items, got {_kind(data)}")
    _check_count(len(data), max_items, "items")
    items = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise RequestError(422, f"items[{i}] must be an object, got {_kind(raw)}")
        try:
            item = RewardItem.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"items[{i}].{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise RequestError(422, problems) from None
        if item.completion is None and item.rewrite is None:
            raise RequestError(422, f"items[{i}]: give 'completion' (the model's response) or 'rewrite'")
        items.append(clip_item(item, config, max_chars))
    return items


def native_response(samples: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, Any]:
    results = [{k: _finite(v) for k, v in s.items()} for s in samples]
    summary = {"count": float(len(samples)), **inflation_summary(results)}
    return {"results": results, "keys": list(keys), "summary": summary}


# -- retrieve --------------------------------------------------------------------------------------------
def parse_retrieve(data: Any, max_items: int, max_topk: int) -> tuple[list[str], int, bool, list[str] | None]:
    """(queries, topk, return_scores, reference_ids) of a Search-R1 style ``/retrieve`` request.

    >>> parse_retrieve({"queries": ["a dog"], "topk": 2, "return_scores": True}, 10, 100)
    (['a dog'], 2, True, None)
    """
    data = _object(data, "fields 'queries', 'topk' and 'return_scores'")
    unknown = sorted(set(data) - {"queries", "topk", "return_scores", "reference_ids"})
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; expected queries, topk, return_scores, reference_ids")
    queries = _string_list(data, "queries", "strings")
    assert queries is not None
    _check_count(len(queries), max_items, "queries")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise RequestError(422, f"queries[{i}] must be a string, got {_kind(q)}")
    topk = data.get("topk", 3)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise RequestError(422, f"'topk' must be a positive integer, got {topk!r}")
    if topk > max_topk:
        raise RequestError(422, f"'topk' is {topk}, above max_topk={max_topk}")
    return_scores = data.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise RequestError(422, f"'return_scores' must be true or false, got {return_scores!r}")
    refs = _string_list(data, "reference_ids", "corpus ids (composed retrieval)", required=False)
    if refs is not None:
        if len(refs) != len(queries):
            raise RequestError(422, f"got {len(queries)} queries but {len(refs)} reference_ids")
        for i, r in enumerate(refs):
            if not isinstance(r, str):
                raise RequestError(422, f"reference_ids[{i}] must be a string, got {_kind(r)}")
    return queries, topk, return_scores, refs


def retrieve_response(scores: Sequence[Sequence[float]], ids: Sequence[Sequence[str]],
                      return_scores: bool) -> dict[str, Any]:
    result: list[list[Any]] = []
    for row_scores, row_ids in zip(scores, ids):
        if return_scores:
            result.append([{"document": {"id": i}, "score": _finite(float(s))} for i, s in zip(row_ids, row_scores)])
        else:
            result.append([{"id": i} for i in row_ids])
    return {"result": result}
