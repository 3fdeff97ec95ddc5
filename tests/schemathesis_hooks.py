"""schemathesis hooks for tests/test_server.py's run of every check against the published schema.

Two rules of the contract are stated in the schema's descriptions because no JSON schema can check them: every id
names an item of the served corpus, and lists sent side by side (OpenRLHF's query, prompts and labels; /retrieve's
queries and reference_ids) hold one entry per sample. In positive cases (data the schema allows) these hooks make
generated data follow them: each generated id becomes a corpus id (chosen from the id's text, so a case is
reproducible), and the side lists are cut or padded to the first one's length. Negative cases are left as
generated. The corpus ids come from the environment variable GRAPE_SCHEMATHESIS_IDS (a JSON list).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import schemathesis

IDS: list[str] = json.loads(os.environ.get("GRAPE_SCHEMATHESIS_IDS", "[]"))


def corpus_id(value: Any) -> str:
    return IDS[zlib.crc32(json.dumps(value).encode()) % len(IDS)]


def corpus_ids(values: list[Any]) -> list[str]:
    return [corpus_id(v) for v in values]


def resized(values: list[Any], n: int, pad: Any) -> list[Any]:
    return values[:n] + [pad] * (n - len(values))


def label_in_corpus(label: Any) -> Any:
    if isinstance(label, str):
        return corpus_id(label)
    if isinstance(label, list):
        return corpus_ids(label)
    label = dict(label)
    label["target_ids"] = corpus_ids(label["target_ids"])
    label["excluded_ids"] = corpus_ids(label.get("excluded_ids") or [])
    if label.get("reference_id") is not None:
        label["reference_id"] = corpus_id(label["reference_id"])
    return label


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return case
    body = dict(case.body)
    path = case.operation.path
    if path == "/get_reward":
        n = len(body["query"])
        body["labels"] = [label_in_corpus(label) for label in resized(body["labels"], n, IDS[0])]
        if isinstance(body.get("prompts"), list):
            body["prompts"] = resized(body["prompts"], n, "")
    elif path == "/v1/rewards":
        body["items"] = [label_in_corpus(item) for item in body["items"]]
    elif path == "/retrieve" and isinstance(body.get("reference_ids"), list):
        body["reference_ids"] = corpus_ids(resized(body["reference_ids"], len(body["queries"]), IDS[0]))
    case.body = body
    return case
