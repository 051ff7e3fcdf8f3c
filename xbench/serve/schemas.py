"""Request validation for the three rerank APIs. One parsed shape, errors that name the field.

- /v1/rerank (Cohere v1, Jina): query, documents [str | {"text": str}], top_n, return_documents, raw_scores
- /v2/rerank (Cohere v2): query, documents, top_n, max_tokens_per_doc, raw_scores
- /rerank (Text Embeddings Inference): query, texts, raw_scores, return_text, truncate, truncation_direction
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An error with its HTTP status, its kind (TEI's error_type) and the field it concerns."""

    def __init__(self, status: int, message: str, kind: str = "Validation", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}


@dataclass
class RerankQuery:
    api: str  # "cohere" | "cohere-v2" | "tei"
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    raw_scores: bool = False
    truncate: bool = True
    truncation_direction: str = "right"
    max_tokens_per_doc: int | None = None


def _field(body: dict, name: str, kind: type | tuple[type, ...], required: bool = False, default: Any = None) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise ApiError(422, f"missing field `{name}`", param=name)
        return default
    value = body[name]
    # bool is an int in Python; a JSON true is no top_n
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ApiError(422, f"field `{name}` must be {_json_type(expected)}, got {_json_type(type(value).__name__)}", param=name)
    return value


def _json_type(py: str) -> str:
    return {"str": "a string", "int": "an integer", "bool": "a boolean", "list": "an array", "dict": "an object",
            "float": "a number", "NoneType": "null"}.get(py, py)


def _documents(raw: Any, name: str, max_documents: int) -> list[str]:
    if not isinstance(raw, list):
        raise ApiError(422, f"field `{name}` must be an array", param=name)
    if not raw:
        raise ApiError(422, f"field `{name}` must not be empty", param=name)
    if len(raw) > max_documents:
        raise ApiError(413, f"`{name}` holds {len(raw)} documents; the limit is max_client_batch_size={max_documents}",
                       param=name)
    docs = []
    for i, d in enumerate(raw):
        if isinstance(d, dict) and isinstance(d.get("text"), str):
            d = d["text"]
        if not isinstance(d, str):
            raise ApiError(422, f"`{name}[{i}]` must be a string or an object {{\"text\": string}}", param=f"{name}[{i}]")
        docs.append(d)
    return docs


def parse(api: str, body: Any, max_documents: int) -> RerankQuery:
    if not isinstance(body, dict):
        raise ApiError(422, "request body must be a JSON object")
    query = _field(body, "query", str, required=True)
    model = _field(body, "model", str)
    raw_scores = _field(body, "raw_scores", bool, default=False)
    if api == "tei":
        if "texts" not in body:
            raise ApiError(422, "missing field `texts`", param="texts")
        direction = _field(body, "truncation_direction", str, default="right")
        if direction.lower() not in ("left", "right"):
            raise ApiError(422, "field `truncation_direction` must be \"left\" or \"right\"", param="truncation_direction")
        return RerankQuery(api, query, _documents(body["texts"], "texts", max_documents), model=model,
                           raw_scores=raw_scores, return_documents=_field(body, "return_text", bool, default=False),
                           truncate=_field(body, "truncate", bool, default=True), truncation_direction=direction.lower())
    if "documents" not in body:
        raise ApiError(422, "missing field `documents`", param="documents")
    docs = _documents(body["documents"], "documents", max_documents)
    top_n = _field(body, "top_n", int)
    if top_n is not None and top_n <= 0:
        raise ApiError(422, f"field `top_n` must be a positive integer, got {top_n}", param="top_n")
    q = RerankQuery(api, query, docs, model=model, top_n=top_n, raw_scores=raw_scores)
    if api == "cohere":
        q.return_documents = _field(body, "return_documents", bool, default=False)
    else:
        n = _field(body, "max_tokens_per_doc", int)
        if n is not None and n <= 0:
            raise ApiError(422, f"field `max_tokens_per_doc` must be a positive integer, got {n}", param="max_tokens_per_doc")
        q.max_tokens_per_doc = n
    return q
