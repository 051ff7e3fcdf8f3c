"""Text Embeddings Inference rerank: POST /rerank.

Request `{"query", "texts": [str], "raw_scores"?, "return_text"?, "truncate"?,
"truncation_direction"?}`; response a bare array `[{"index", "score", "text"?}]` sorted by score;
errors TEI's flat `{"error", "error_type"}`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import field_validator

from xbench.core.request import RerankResult
from xbench.errors import ErrorKind, ServiceError
from xbench.serve.apis.base import Dialect, Documents, RerankQuery, StrictRequest

# TEI's error_type names (its router's ErrorType), per kind of error.
ERROR_TYPES = {
    ErrorKind.MALFORMED: "Validation", ErrorKind.UNAUTHORIZED: "Unauthorized", ErrorKind.TOO_LARGE: "Validation",
    ErrorKind.NOT_FOUND: "NotFound", ErrorKind.METHOD_NOT_ALLOWED: "Validation",
    ErrorKind.VALIDATION: "Validation", ErrorKind.TOO_LONG: "Validation",
    ErrorKind.OVERLOADED: "Overloaded", ErrorKind.CANCELLED: "Cancelled", ErrorKind.INTERNAL: "Backend",
    ErrorKind.UNAVAILABLE: "Unhealthy", ErrorKind.TIMEOUT: "Validation",
}
# The statuses TEI's router gives its own error types (router/src/http/server.rs, `From<&ErrorType>
# for StatusCode`): its validation errors (too many texts, an input too long with truncation off)
# are 413, a backend failure 424. Errors its web framework answers before the router (unparseable
# JSON, wrong field types, unknown routes, auth) keep xbench's status.
STATUSES = {ErrorKind.TOO_LONG: 413, ErrorKind.INTERNAL: 424}


class TeiRequest(StrictRequest):
    query: str
    texts: Documents
    model: Optional[str] = None
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True
    truncation_direction: Literal["left", "right"] = "right"

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _any_case(cls, v: Any) -> Any:  # TEI accepts "Left"/"Right"
        return v.lower() if isinstance(v, str) else v


class Tei(Dialect):
    name = "tei"
    path = "/rerank"
    documents_field = "texts"
    request_model = TeiRequest

    def query(self, r: TeiRequest) -> RerankQuery:
        return RerankQuery(r.query, r.texts, model=r.model, raw_scores=r.raw_scores, return_documents=r.return_text,
                           truncate=r.truncate, truncation_direction=r.truncation_direction)

    def render(self, query: RerankQuery, model: str, result: RerankResult, scores: Any, order: Any) -> Any:
        return [{"index": int(i), "score": float(scores[i]), **({"text": query.documents[i]} if query.return_documents else {})}
                for i in order]

    def error_body(self, error: ServiceError) -> Any:
        return {"error": error.message, "error_type": ERROR_TYPES[error.kind]}

    def status(self, error: ServiceError) -> int:
        return STATUSES.get(error.kind, error.status)

    def request_body(self, query: str, documents: list[str], model: str | None) -> dict[str, Any]:
        return {"query": query, "texts": documents, "raw_scores": False}
