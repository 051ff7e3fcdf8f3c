"""Cohere v1 (and Jina) rerank: POST /v1/rerank.

Request `{"query", "documents": [str | {"text"}], "model"?, "top_n"?, "return_documents"?,
"raw_scores"?}`; response `{"id", "model", "results": [{"index", "relevance_score",
"document"?}], "usage", "meta"}` sorted by score; errors `{"error": {"message", "type", "param"}}`.
"""

from __future__ import annotations

import uuid
from typing import Any, Optional

from pydantic import PositiveInt

from xbench.core.request import RerankResult
from xbench.errors import ErrorKind, ServiceError
from xbench.serve.apis.base import Dialect, Documents, RerankQuery, StrictRequest

# The `type` Cohere-style clients read, per kind of error.
ERROR_TYPES = {
    ErrorKind.MALFORMED: "invalid_request_error", ErrorKind.UNAUTHORIZED: "authentication_error",
    ErrorKind.NOT_FOUND: "not_found_error", ErrorKind.METHOD_NOT_ALLOWED: "invalid_request_error",
    ErrorKind.TIMEOUT: "request_timeout",
    ErrorKind.TOO_LARGE: "request_too_large", ErrorKind.VALIDATION: "validation_error",
    ErrorKind.TOO_LONG: "validation_error", ErrorKind.OVERLOADED: "overloaded",
    ErrorKind.CANCELLED: "client_closed_request", ErrorKind.INTERNAL: "backend_error",
    ErrorKind.UNAVAILABLE: "not_ready",
}


class CohereV1Request(StrictRequest):
    query: str
    documents: Documents
    model: Optional[str] = None
    top_n: Optional[PositiveInt] = None
    return_documents: bool = False
    raw_scores: bool = False


class CohereV1(Dialect):
    name = "cohere"
    path = "/v1/rerank"
    request_model = CohereV1Request
    api_version = "1"

    def query(self, r: CohereV1Request) -> RerankQuery:
        return RerankQuery(r.query, r.documents, model=r.model, top_n=r.top_n, return_documents=r.return_documents,
                           raw_scores=r.raw_scores)

    def render(self, query: RerankQuery, model: str, result: RerankResult, scores: Any, order: Any) -> Any:
        results = [{"index": int(i), "relevance_score": float(scores[i]),
                    **({"document": {"text": query.documents[i]}} if query.return_documents else {})} for i in order]
        return {"id": str(uuid.uuid4()), "model": model, "results": results,
                "usage": {"total_tokens": result.total_tokens},
                "meta": {"api_version": {"version": self.api_version}, "billed_units": {"search_units": 1}}}

    def error_body(self, error: ServiceError) -> Any:
        return {"error": {"message": error.message, "type": ERROR_TYPES[error.kind], "param": error.param}}

    def request_body(self, query: str, documents: list[str], model: str | None) -> dict[str, Any]:
        return {"query": query, "documents": documents, **({"model": model} if model else {})}
