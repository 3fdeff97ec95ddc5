"""The service's API contract: pydantic models of every request and answer, published as OpenAPI.

The endpoints validate requests by hand on the hot path (:mod:`.protocol`); these models describe the same
shapes for ``/openapi.json`` and ``/docs``, so client generators and API fuzzers can use the service's own
contract. ``tests/test_server.py`` checks that real answers validate against them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from ..labels import Label
from ..scorer import RewardItem

REF = "#/components/schemas/{model}"


class Problem(BaseModel):
    """Every error: a 4xx names what was wrong; a 503 carries Retry-After; a 500 says only that it was logged."""

    detail: str


class OpenRLHFRequest(BaseModel):
    """``POST /get_reward``: OpenRLHF's remote reward request."""

    model_config = ConfigDict(extra="allow")

    query: list[str] = Field(description="templated prompt + response, special tokens kept, one per sample")
    prompts: list[str] | None = Field(default=None, description="the templated prompts, one per sample")
    labels: list[Label | str | list[str]] = Field(
        description="one label per sample: the label object, its JSON string, a bare id or a list of ids")


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    scores: list[float] = Field(description="the rank part of each reward, in [0, 1]")
    extra_logs: dict[str, list[float | None]] = Field(description="per-sample statistics OpenRLHF logs")


class RewardsRequest(BaseModel):
    """``POST /v1/rewards``: the native API."""

    model_config = ConfigDict(extra="forbid")

    items: list[RewardItem]


class RewardsResponse(BaseModel):
    results: list[dict[str, float | None]] = Field(description="per sample: the reward, its parts and statistics")
    keys: list[str]
    summary: dict[str, float]


class RetrieveRequest(BaseModel):
    """``POST /retrieve``: top-k search in the Search-R1 shape."""

    model_config = ConfigDict(extra="forbid")

    queries: list[str]
    topk: int = Field(default=3, ge=1)
    return_scores: bool = False
    reference_ids: list[str] | None = Field(default=None, description="composed retrieval: one corpus id per query")


class DocumentId(BaseModel):
    id: str


class ScoredDocument(BaseModel):
    document: DocumentId
    score: float


class RetrieveResponse(BaseModel):
    result: list[list[ScoredDocument | DocumentId]] = Field(
        description="per query, best first: documents with scores (return_scores) or ids alone")


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


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, with the request models (read by hand, so FastAPI cannot see them) added."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in REQUESTS.values()], ref_template=REF)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    app.openapi_schema = schema
    return schema
