"""JSON Lines: the objects of a file with their line numbers, errors that name the line, and JSON kinds named."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def jsonl_objects(lines: Iterable[str], error: Callable[[int, str], Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line (numbered from 1); a line that is not a JSON object raises
    ``error(line_number, problem)``, so each caller keeps its own exception type and message prefix.

    >>> list(jsonl_objects(['{"a": 1}', "", '{"b": 2}'], lambda n, p: ValueError(f"line {n}: {p}")))
    [(1, {'a': 1}), (3, {'b': 2})]
    >>> list(jsonl_objects(["[1]"], lambda n, p: ValueError(f"line {n}: {p}")))
    Traceback (most recent call last):
    ValueError: line 1: expected a JSON object, got list
    """
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(n, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise error(n, f"expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def json_kind(value: Any) -> str:
    """What a JSON value is, in words, for error messages.

    >>> json_kind([1]), json_kind(None), json_kind(True)
    ('a list', 'null', 'a boolean')
    """
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
