"""Cohere v2 rerank: POST /v2/rerank. As v1 (response and error shapes too), without
`return_documents`, with `max_tokens_per_doc` (each document cut after its first N tokens)."""

from __future__ import annotations

from typing import Optional

from pydantic import PositiveInt

from xbench.serve.apis.base import Documents, RerankQuery, StrictRequest
from xbench.serve.apis.cohere_v1 import CohereV1


class CohereV2Request(StrictRequest):
    query: str
    documents: Documents
    model: Optional[str] = None
    top_n: Optional[PositiveInt] = None
    max_tokens_per_doc: Optional[PositiveInt] = None
    raw_scores: bool = False


class CohereV2(CohereV1):
    name = "cohere-v2"
    path = "/v2/rerank"
    request_model = CohereV2Request
    api_version = "2"

    def query(self, r: CohereV2Request) -> RerankQuery:  # type: ignore[override]
        return RerankQuery(r.query, r.documents, model=r.model, top_n=r.top_n, raw_scores=r.raw_scores,
                           max_tokens_per_doc=r.max_tokens_per_doc)
