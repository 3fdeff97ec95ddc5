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
    -> {"result": [[{"document": {"id": str, "contents": str}, "score": float}, ...], ...],
        "contents_kind": "text" | "id"}                 (without scores: the documents alone, as Search-R1's server)

``contents`` is the item's text (a titled item's title in double quotes on its first line: Search-R1's passage
format, which its agent splits into title and text), or the item's id where the index keeps no texts (image
corpora, indexes built before texts were kept, and their shards); ``contents_kind`` says which.

Pure functions, no I/O, no scoring rules: items are read and checked by the scorer layer
(:func:`~grape_rewards.scorer.read_item`, :meth:`~grape_rewards.scorer.RewardScorer.validate`) and answers shaped by
:mod:`grape_rewards.framework_io`; this module only turns JSON into their inputs. The app maps
:class:`RequestError` to its status code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..framework_io import finite, openrlhf_item
from ..jsonl import json_kind
from ..labels import LabelError, parse_label
from ..scorer import ItemError, RewardItem, check_text, read_item

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

class RequestError(ValueError):
    """A request the service cannot score; ``status`` is the HTTP status (400, 408, 413 or 422).

    The message is made printable as UTF-8 (a lone surrogate echoed from the request is escaped), so it can
    always be sent back.
    """

    def __init__(self, status: int, message: str) -> None:
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
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
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON: it nests deeper than the parser allows") from None


def _object(data: Any, fields: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object with {fields}, got {json_kind(data)}")
    return data


def _string_list(data: dict[str, Any], name: str, what: str, required: bool = True) -> list[Any] | None:
    value = data.get(name)
    if value is None:
        if required:
            raise RequestError(422, f"missing field {name!r} (a list of {what})")
        return None
    if not isinstance(value, list):
        raise RequestError(422, f"{name!r} must be a list of {what}, got {json_kind(value)}")
    return value


def _check_count(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise RequestError(413, f"too many {what} in one request: {n} > max_items_per_request={limit}; "
                                "split the request")


# -- OpenRLHF ---------------------------------------------------------------------------------------------
def parse_openrlhf(data: Any, max_items: int) -> list[RewardItem]:
    """Items of an OpenRLHF ``/get_reward`` request (validated by hand: this is the hot path).

    >>> items = parse_openrlhf({"query": ["<|im_start|>assistant\\na dog<|im_end|>"], "prompts": [""],
    ...                         "labels": ['{"target_ids": ["c1"]}']}, 10)
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
            raise RequestError(422, f"query[{i}] must be a string, got {json_kind(query)}")
        prompt = prompts[i] if prompts is not None else None
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError(422, f"prompts[{i}] must be a string, got {json_kind(prompt)}")
        try:
            label = parse_label(labels[i])
        except LabelError as exc:
            raise RequestError(422, f"labels[{i}]: {exc}") from None
        items.append(openrlhf_item(query, prompt, label))
    return items


# -- native ----------------------------------------------------------------------------------------------
def parse_native(data: Any, max_items: int) -> list[RewardItem]:
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
        raise RequestError(422, f"'items' must be a list of reward items, got {json_kind(data)}")
    _check_count(len(data), max_items, "items")
    try:
        return [read_item(raw, f"items[{i}]") for i, raw in enumerate(data)]
    except ItemError as exc:
        raise RequestError(422, str(exc)) from None


# -- retrieve --------------------------------------------------------------------------------------------
def parse_retrieve(data: Any, max_items: int, max_topk: int,
                   max_chars: int = 20000) -> tuple[list[str], int, bool, list[str] | None]:
    """(queries, topk, return_scores, reference_ids) of a Search-R1 style ``/retrieve`` request; each query is
    checked and cut to ``max_chars`` (:func:`~grape_rewards.scorer.check_text`).

    >>> parse_retrieve({"queries": ["a dog"], "topk": 2, "return_scores": True}, 10, 100)
    (['a dog'], 2, True, None)
    >>> parse_retrieve({"queries": ["a dog"], "topk": 2.0}, 10, 100)[1]
    2
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
            raise RequestError(422, f"queries[{i}] must be a string, got {json_kind(q)}")
    try:
        queries = [check_text(q, f"queries[{i}]", max_chars) for i, q in enumerate(queries)]
    except ItemError as exc:
        raise RequestError(422, str(exc)) from None
    topk = data.get("topk", 3)
    if isinstance(topk, float) and topk.is_integer():  # 3.0 is an integer in JSON (and its schema)
        topk = int(topk)
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
                raise RequestError(422, f"reference_ids[{i}] must be a string, got {json_kind(r)}")
    return queries, topk, return_scores, refs


def retrieve_response(scores: Sequence[Sequence[float]], ids: Sequence[Sequence[str]],
                      contents: Sequence[Sequence[str]], contents_kind: str, return_scores: bool) -> dict[str, Any]:
    """The ``/retrieve`` answer of each query's found ids, their scores and contents.

    >>> retrieve_response([[0.5]], [["c1"]], [["a dog"]], "text", True)
    {'result': [[{'document': {'id': 'c1', 'contents': 'a dog'}, 'score': 0.5}]], 'contents_kind': 'text'}
    >>> retrieve_response([[0.5]], [["c1"]], [["a dog"]], "text", False)["result"]
    [[{'id': 'c1', 'contents': 'a dog'}]]
    """
    result: list[list[Any]] = []
    for row_scores, row_ids, row_contents in zip(scores, ids, contents):
        documents = [{"id": i, "contents": c} for i, c in zip(row_ids, row_contents)]
        if return_scores:
            result.append([{"document": d, "score": finite(float(s))} for d, s in zip(documents, row_scores)])
        else:
            result.append(documents)
    return {"result": result, "contents_kind": contents_kind}
