"""What every rerank API dialect shares: the parsed query, typed validation that names the
field, and the Dialect interface each of cohere_v1.py, cohere_v2.py and tei.py implements.

A dialect owns everything its clients see: the request model (pydantic, strict types, unknown
fields ignored as the real servers do), the response body, the error shape, and on the client
side (`xbench load`) its default path and request body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

from xbench.core.request import RerankResult
from xbench.errors import ErrorKind, ServiceError
from xbench.workload import document_text


@dataclass
class RerankQuery:
    """One validated rerank request, whatever its dialect."""

    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    raw_scores: bool = False
    truncate: bool = True
    truncation_direction: str = "right"
    max_tokens_per_doc: int | None = None


def _texts(docs: list[Any]) -> list[str]:
    out = []
    for i, d in enumerate(docs):
        text = document_text(d)
        if text is None:
            raise PydanticCustomError("document", 'must be a string or an object {"text": string}', {"index": i})
        out.append(text)
    return out


# A non-empty array of strings or {"text": string} objects, normalized to strings.
Documents = Annotated[list[Any], Field(min_length=1), AfterValidator(_texts)]


class StrictRequest(BaseModel):
    """Strict JSON types (no "1" for 1, no true for an integer); unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


JSON_TYPES = {"string_type": "a string", "int_type": "an integer", "bool_type": "a boolean", "list_type": "an array",
              "dict_type": "an object", "float_type": "a number"}


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _field_name(loc: tuple[Any, ...], ctx: dict[str, Any] | None) -> str:
    name = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    if ctx and "index" in ctx:
        name += f"[{ctx['index']}]"
    return name


def validation_error(exc: ValidationError) -> ServiceError:
    """The first problem of a pydantic error, as a 422 whose message names the field."""
    e = exc.errors()[0]
    field = _field_name(tuple(e["loc"]), e.get("ctx"))
    kind = e["type"]
    if kind == "missing":
        message = f"missing field `{field}`"
    elif kind in JSON_TYPES:
        message = f"field `{field}` must be {JSON_TYPES[kind]}, got {_json_type(e['input'])}"
    elif kind == "greater_than":
        message = f"field `{field}` must be a positive integer, got {e['input']}"
    elif kind == "too_short":
        message = f"field `{field}` must not be empty"
    elif kind == "document":
        message = f"`{field}` {e['msg']}"
    else:
        message = f"field `{field}`: {e['msg']}"
    return ServiceError(ErrorKind.VALIDATION, message, param=field)


def validate(model: type[StrictRequest], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ServiceError(ErrorKind.VALIDATION, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_count(documents: list[Any], field: str, limit: int) -> None:
    if isinstance(documents, list) and len(documents) > limit:
        raise ServiceError(ErrorKind.TOO_LARGE, f"`{field}` holds {len(documents)} documents; the limit is "
                           f"max_client_batch_size={limit}", param=field)


class Dialect:
    """One rerank API: the route it serves, how it parses, renders and fails, and (for `xbench
    load`) what a client sends it."""

    name: ClassVar[str]
    path: ClassVar[str]
    documents_field: ClassVar[str] = "documents"
    request_model: ClassVar[type[StrictRequest]]

    def parse(self, body: Any, max_documents: int, max_query_chars: int) -> RerankQuery:
        """A validated query; too many documents is a 413 before any is looked at, and so is a
        query past max_query_chars (it is paired with every document)."""
        if isinstance(body, dict):
            check_count(body.get(self.documents_field), self.documents_field, max_documents)
        query = self.query(validate(self.request_model, body))
        if len(query.query) > max_query_chars:
            raise ServiceError(ErrorKind.TOO_LARGE, f"`query` is {len(query.query)} characters; the limit is "
                               f"max_query_chars={max_query_chars}", param="query")
        return query

    def query(self, request: Any) -> RerankQuery:
        """The dialect's validated request model as the one query shape."""
        raise NotImplementedError

    def render(self, query: RerankQuery, model: str, result: RerankResult, scores: Any, order: Any) -> Any:
        raise NotImplementedError

    def error_body(self, error: ServiceError) -> Any:
        raise NotImplementedError

    def status(self, error: ServiceError) -> int:
        """The HTTP status this dialect's server answers the error with (xbench's own by default)."""
        return error.status

    def error_response(self, error: ServiceError) -> JSONResponse:
        """The one place an error becomes a response. Pairs over the length limit are among this
        dialect's documents: the core that finds them does not know the field's name."""
        if error.kind is ErrorKind.TOO_LONG and error.param is None:
            error.param = self.documents_field
        return JSONResponse(self.error_body(error), status_code=self.status(error), headers=error.headers)

    def request_body(self, query: str, documents: list[str], model: str | None) -> dict[str, Any]:
        raise NotImplementedError
