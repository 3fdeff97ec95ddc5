"""The service's API contract: pydantic models of every request and answer, published as ``/openapi.json``.

The endpoints validate requests by hand on the hot path (:mod:`.protocol`); these models describe the same
shapes, and :func:`contract` adds what the service checks beyond the models' types (one of completion or rewrite,
non-empty ids, the request limits, what the reward settings require), so that a request the schema allows is
never refused for its shape. Two rules no JSON schema can check are stated in the descriptions: lists sent side
by side hold one entry per sample, and every id names a corpus item. ``tests/test_server.py`` runs schemathesis,
every check, against the published schema.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from ..labels import Label
from ..scorer import RewardItem
from .metrics import CONTENT_TYPE

REF = "#/components/schemas/{model}"


class Problem(BaseModel):
    """Every error: a 4xx names what was wrong; a 503 carries Retry-After; a 500 says only that it was logged."""

    detail: str


class OpenRLHFRequest(BaseModel):
    """POST /get_reward: OpenRLHF's remote reward request. query, prompts and labels hold one entry per sample."""

    model_config = ConfigDict(extra="allow")

    query: list[str] = Field(description="templated prompt + response, special tokens kept, one per sample")
    prompts: list[str] | None = Field(default=None, description="the templated prompts, one per sample")
    labels: list[Label | str | list[str]] = Field(
        description="one label per sample: the label object, a bare corpus id or a list of them. The service also "
                    "reads the label object written as JSON text (what OpenRLHF sends from a text column); a schema "
                    "cannot check the JSON inside a string, so that form is described here only")


class OpenRLHFResponse(BaseModel):
    rewards: list[float] = Field(description="the reward of each sample: a composite of its parts, in the reward "
                                             "config's range (an empty or unparsable rewrite gets the format penalty)")
    scores: list[float] = Field(
        description="the rank part of each reward, in [0, 1], and 0 for a sample without a rewrite to rank. Not the "
                    "reward: OpenRLHF's dynamic filtering reads scores and drops a prompt whose samples' mean score "
                    "is outside (0, 1) by default, so they must stay in [0, 1]; a reward of -1 there would drop a "
                    "group of half failures and half rank-1 rewrites (mean 0), the group that teaches most")
    extra_logs: dict[str, list[float | None]] = Field(description="per-sample statistics OpenRLHF logs")


class RewardsRequest(BaseModel):
    """POST /v1/rewards: the native API. Every id names a corpus item."""

    model_config = ConfigDict(extra="forbid")

    items: list[RewardItem]


class RewardsResponse(BaseModel):
    results: list[dict[str, float | None]] = Field(description="per sample: the reward, its parts and statistics")
    keys: list[str]
    summary: dict[str, float]


class RetrieveRequest(BaseModel):
    """POST /retrieve: top-k search in the Search-R1 shape."""

    model_config = ConfigDict(extra="forbid")

    queries: list[str]
    topk: int = Field(default=3, ge=1)
    return_scores: bool = False
    reference_ids: list[str] | None = Field(default=None, description="composed retrieval: one corpus id per query "
                                                                      "(as many as queries)")


class Document(BaseModel):
    """A corpus item, as Search-R1's retrieval server answers it."""

    id: str
    contents: str = Field(description="text corpora: the item's text, a titled item's title in double quotes on its "
                                      "first line (Search-R1's passage format); otherwise the item's id "
                                      "(contents_kind says which)")


class ScoredDocument(BaseModel):
    document: Document
    score: float


class RetrieveResponse(BaseModel):
    result: list[list[ScoredDocument | Document]] = Field(
        description="per query, best first: documents with scores (return_scores) or the documents alone")
    contents_kind: Literal["text", "id"] = Field(
        description="what each document's contents is: 'text', the item's text; 'id', its id, where the index keeps "
                    "no texts (image corpora, indexes built before texts were kept, and their shards)")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    """200 with ready true once work is accepted; 503 with ready false and the reason while starting or draining."""

    ready: bool
    reason: str | None = None


class Info(BaseModel):
    """What is served: version, retriever, index, reward config, alarms, ensemble, server settings, uptime."""

    model_config = ConfigDict(extra="allow")

    version: str


def metrics_response() -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of ``GET /metrics``: Prometheus' text exposition format, not JSON."""
    return {200: {"description": "Prometheus text exposition format (version 0.0.4)",
                  "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}}


REQUESTS: dict[str, type[BaseModel]] = {
    "/get_reward": OpenRLHFRequest, "/v1/rewards": RewardsRequest, "/retrieve": RetrieveRequest}
"""The request model of each POST endpoint."""


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route whose body is read by hand but has the shape of ``model``."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entries of a route's error statuses (all :class:`Problem`)."""
    return {status: {"model": Problem} for status in statuses}


ID: dict[str, Any] = {"type": "string", "minLength": 1, "description": "a corpus id"}
BARE_ID: dict[str, Any] = {"type": "string", "pattern": "^\\s*[^\\s\\[{\"]", "description": "a corpus id"}
"""A label given as a bare id (text that does not open a JSON object, list or string, which would be read as JSON)."""
TEXT: dict[str, Any] = {"type": "string", "pattern": "\\S"}
"""A text with a character other than whitespace."""


def contract(schemas: dict[str, Any], *, max_items: int, max_topk: int, relative: bool = False,
             reference: bool = False, search_reference: bool = False) -> dict[str, Any]:
    """The request schemas with what the service checks beyond the models' types (a new dict).

    Args:
        schemas: the components generated from :data:`REQUESTS` (``Label``, ``RewardItem``, each request).
        max_items, max_topk: the service's limits (``max_items_per_request``, ``max_topk``).
        relative: the relative reward mode: every sample needs its original query.
        reference: a composed retriever: every sample needs its reference image's id.
        search_reference: ``/retrieve`` needs one reference id per query (composed, not text fusion).
    """
    out = copy.deepcopy(schemas)
    for name in ("Label", "RewardItem"):
        props, required = out[name]["properties"], out[name].setdefault("required", [])
        props["target_ids"]["items"] = ID
        props["excluded_ids"]["items"] = ID
        props["reference_id"] = ID if reference else {"anyOf": [ID, {"type": "null"}], "default": None}
        if reference:
            required.append("reference_id")
        if relative:
            props["original_query"] = {**TEXT, "description": "the query before rewriting (relative reward mode)"}
            required.append("original_query")
    out["RewardItem"]["anyOf"] = [
        {"required": [field], "properties": {field: {"type": "string"}}} for field in ("completion", "rewrite")]
    out["RewardItem"]["description"] = ("One sample to score: the completion (the model's response) or an already "
                                        "extracted rewrite, at least one of them, and where its target is.")
    label_forms: list[dict[str, Any]] = [{"$ref": REF.format(model="Label")}]
    if not reference:  # the short forms carry no reference image
        label_forms += [BARE_ID, {"type": "array", "items": ID, "minItems": 1}]
    get_reward = out["OpenRLHFRequest"]["properties"]
    get_reward["query"]["maxItems"] = max_items
    get_reward["labels"]["items"] = {"anyOf": label_forms}
    get_reward["prompts"]["anyOf"][0]["maxItems"] = max_items
    out["RewardsRequest"]["properties"]["items"]["maxItems"] = max_items
    search = out["RetrieveRequest"]
    search["properties"]["queries"]["maxItems"] = max_items
    search["properties"]["topk"]["maximum"] = max_topk
    references = {"type": "array", "items": ID, "maxItems": max_items}
    search["properties"]["reference_ids"] = {
        **(references if search_reference else {"anyOf": [references, {"type": "null"}], "default": None}),
        "description": search["properties"]["reference_ids"]["description"]}
    if search_reference:
        search["required"].append("reference_ids")
    return out


def build_openapi(app: FastAPI, open_paths: Iterable[str] = ()) -> dict[str, Any]:
    """The app's OpenAPI document: the request models (read by hand, so FastAPI cannot see them) with
    :func:`contract`'s rules for this service, and the bearer token when the service wants one (not on
    ``open_paths``). Cached once the scorer is loaded (what the rules depend on)."""
    if app.openapi_schema:
        return app.openapi_schema
    state = app.state.service
    config, scorer = state.config, state.scorer
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in REQUESTS.values()], ref_template=REF)
    takes_reference = bool(scorer is not None and scorer.retriever.takes_reference)
    rules = contract(defs.get("$defs", {}), max_items=config.max_items_per_request, max_topk=config.max_topk,
                     relative=bool(scorer is not None and scorer.config.relative), reference=takes_reference,
                     search_reference=takes_reference and getattr(scorer.retriever, "fusion", "sum") != "text")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(rules)
    if config.token:  # every route but the probes and the contract wants the bearer token
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        for path in open_paths:
            for operation in schema["paths"].get(path, {}).values():
                operation["security"] = []
    if scorer is not None:
        app.openapi_schema = schema
    return schema
