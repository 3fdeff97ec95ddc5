"""The label schema: what a training row carries so the reward can find the true target.

OpenRLHF passes the dataset's label column untouched (``--data.label_key``), verl passes
``reward_model.ground_truth``, TRL passes dataset columns. All of them carry the same JSON::

    {"target_ids": ["img_123"],          # required: one or more corpus ids of the true target(s)
     "reference_id": "img_77",           # optional: CIRR's reference image (excluded; fused in composed mode)
     "excluded_ids": ["img_9"],          # optional: more ids left out of the ranking
     "query_id": "q42",                  # optional: groups the rollouts of one prompt
     "original_query": "一只狗在草地上"}  # optional: needed by the relative reward mode

Short forms are accepted: a JSON string of that object, a bare id (``"img_123"``), or a list of ids.
"""

from __future__ import annotations

import json
from typing import Any

try:  # labels are parsed once per sample on the service's hot path
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover - orjson is optional
    _json_loads = json.loads

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class LabelError(ValueError):
    """A label that does not follow the schema; the message says what is wrong."""


def ids_as_strings(cls: type, value: Any) -> Any:
    """A field validator (``mode="before"``) for lists of corpus ids: a bare id becomes a list of one, integer ids
    become strings; anything else is left for the field's own validation to refuse."""
    if isinstance(value, (str, int)):
        value = [value]
    if isinstance(value, list):
        return [str(v) if isinstance(v, (int, str)) else v for v in value]
    return value


class Label(BaseModel):
    """Where the true target is, for one training row."""

    model_config = ConfigDict(extra="ignore")

    target_ids: list[str] = Field(min_length=1)
    reference_id: str | None = None
    excluded_ids: list[str] = Field(default_factory=list)
    query_id: str | None = None
    original_query: str | None = None

    _ids_as_strings = field_validator("target_ids", "excluded_ids", mode="before")(ids_as_strings)

    @field_validator("reference_id", "query_id", mode="before")
    @classmethod
    def _id_as_string(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


def parse_label(raw: Any) -> Label:
    """Read a label in any accepted form.

    >>> parse_label('{"target_ids": ["a"], "reference_id": "r"}').reference_id
    'r'
    >>> parse_label("img_1").target_ids, parse_label(["x", 2]).target_ids
    (['img_1'], ['x', '2'])
    """
    if isinstance(raw, Label):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            raise LabelError("empty label: expected the target id(s) as JSON, e.g. {\"target_ids\": [\"img_1\"]}")
        if text[0] in "{[\"":
            try:
                raw = _json_loads(text)
            except json.JSONDecodeError as exc:  # orjson's JSONDecodeError subclasses it
                raise LabelError(f"label is not valid JSON ({exc.msg}): {text[:80]!r}") from None
            except RecursionError:
                raise LabelError(f"label is not valid JSON (it nests deeper than the parser allows): "
                                 f"{text[:80]!r}") from None
        else:
            raw = text
    if isinstance(raw, (str, int)):
        raw = {"target_ids": [raw]}
    elif isinstance(raw, list):
        raw = {"target_ids": raw}
    if not isinstance(raw, dict):
        raise LabelError(f"label must be an object, an id or a list of ids, got {type(raw).__name__}")
    try:
        return Label.model_validate(raw)
    except RecursionError:
        raise LabelError("bad label (it nests deeper than the validator allows)") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'label'}: {e['msg']}" for e in exc.errors())
        raise LabelError(f"bad label ({problems})") from None
