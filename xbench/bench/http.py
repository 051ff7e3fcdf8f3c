"""`xbench load`: the HTTP target of the one load generator, for any server speaking a rerank API.

`--api` names the server a user runs; each has its default path, its request body and the shape
of its answer (xbench serve's own dialects are three of them):

  cohere     /v1/rerank  {query, documents, model?}          -> {results: [{index, relevance_score}]}
  cohere-v2  /v2/rerank  the same, Cohere's v2 route
  jina       /v1/rerank  {model, query, documents}           -> {results: [...]}
  tei        /rerank     {query, texts}                      -> [{index, score}]
  infinity   /rerank     {model, query, documents}           -> {results: [...]}
  vllm       /rerank     {model, query, documents}           -> {results: [...]}
  vllm-score /score      {model, text_1, text_2: [docs]}     -> {data: [{index, score}]}

A URL with a path overrides the API's path. Before any load, one request checks the endpoint:
any answer but a 2xx of the right shape stops with one line naming what was tried and what to
try instead (exit 2), except the answers of a busy server that say to come back (408, 429, and
503 with Retry-After), which are load to measure. During the load, 50 requests in a row that are
refused as wrong (4xx other than 408 and 429) or cut off stop it the same way instead of
hammering the server; 429s, 5xx and timeouts are measured, not stopped on. A shed answer's
Retry-After travels with its record, so closed-loop clients can wait it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import httpx

from xbench.bench.load import Send, Sent, StopLoad
from xbench.errors import ConfigError
from xbench.serve.apis import DIALECTS
from xbench.workload import Workload

TIMING_HEADERS = {"queue": "x-queue-time", "tokenize": "x-tokenization-time", "infer": "x-inference-time"}
STOP_AFTER_WRONG = 50  # answers in a row saying the request is wrong
WRONG_REQUEST = frozenset(range(400, 500)) - {408, 429}


def excerpt(response: httpx.Response, chars: int = 160) -> str:
    """The start of an answer's body on one line (an HTML error page included)."""
    return " ".join(response.text.split())[:chars]


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds a 429/503 asks the client to wait (the delta-seconds form; an HTTP date is ignored)."""
    if response.status_code not in (429, 503):
        return None
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def busy(response: httpx.Response) -> bool:
    """A server that is up but asks to be tried again: measured, not a wrong endpoint."""
    return response.status_code in (408, 429) or (response.status_code == 503 and retry_after_s(response) is not None)


def _results_shape(body: Any, n: int) -> bool:
    results = body.get("results") if isinstance(body, dict) else None
    return isinstance(results, list) and len(results) == n and all("relevance_score" in r for r in results)


def _tei_shape(body: Any, n: int) -> bool:
    return isinstance(body, list) and len(body) == n and all("score" in r for r in body)


def _score_shape(body: Any, n: int) -> bool:
    data = body.get("data") if isinstance(body, dict) else None
    return isinstance(data, list) and len(data) == n and all("score" in r for r in data)


def _with_model(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    return {**body, "model": model} if model else body


@dataclass(frozen=True)
class ClientApi:
    """What a client of one server sends, where, and what a good answer looks like."""

    name: str
    path: str
    body: Callable[[str, list[str], str | None], dict[str, Any]]
    answer_ok: Callable[[Any, int], bool]
    server: str  # who serves it, for messages


def _from_dialect(name: str, server: str) -> ClientApi:
    dialect = DIALECTS[name]
    shape = _tei_shape if name == "tei" else _results_shape
    return ClientApi(name, dialect.path, dialect.request_body, shape, server)


CLIENT_APIS: dict[str, ClientApi] = {a.name: a for a in (
    _from_dialect("cohere", "Cohere"),
    _from_dialect("cohere-v2", "Cohere v2"),
    ClientApi("jina", "/v1/rerank", lambda q, d, m: _with_model({"query": q, "documents": d}, m), _results_shape, "Jina"),
    _from_dialect("tei", "TEI"),
    ClientApi("infinity", "/rerank", lambda q, d, m: _with_model({"query": q, "documents": d}, m), _results_shape,
              "Infinity"),
    ClientApi("vllm", "/rerank", lambda q, d, m: _with_model({"query": q, "documents": d}, m), _results_shape, "vLLM"),
    ClientApi("vllm-score", "/score", lambda q, d, m: _with_model({"text_1": q, "text_2": d}, m), _score_shape,
              "vLLM"),
)}


def client_api(name: str) -> ClientApi:
    if name not in CLIENT_APIS:
        raise ConfigError(f"--api {name!r} is not one of {', '.join(CLIENT_APIS)}")
    return CLIENT_APIS[name]


def endpoint(url: str, api: str) -> str:
    """A bare base URL gets the API's path; a URL with a path is used as given."""
    parsed = urlparse(url)
    if parsed.path in ("", "/"):
        return url.rstrip("/") + client_api(api).path
    return url


def _others_at(path: str, but: str) -> str:
    """'TEI, Infinity and vLLM serve /rerank: try --api tei or ...' for the APIs on other paths."""
    others = [a for a in CLIENT_APIS.values() if a.path != path and a.name != but]
    by_path: dict[str, list[ClientApi]] = {}
    for a in others:
        by_path.setdefault(a.path, []).append(a)

    def names(apis: list[ClientApi]) -> str:
        servers = list(dict.fromkeys(a.server for a in apis))
        return servers[0] if len(servers) == 1 else f"{', '.join(servers[:-1])} and {servers[-1]}"

    return "; ".join(f"{names(apis)} serve{'s' if len({a.server for a in apis}) == 1 else ''} {p}: "
                     f"try --api {' or --api '.join(a.name for a in apis)}" for p, apis in by_path.items())


class HttpTarget:
    def __init__(self, url: str, api: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 300.0):
        self.api = client_api(api)
        self.url = endpoint(url, api)
        self.model = model
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.client: httpx.AsyncClient | None = None
        self.params = {"api": api, "url": self.url, "model_name": model}
        self.model_info = {"name": model or "(server default)", "relevance_trained": None, "source": "remote"}
        self.engine = None
        self.checked = False
        self._wrong_in_a_row = 0

    async def open(self) -> None:
        # No connection cap: the load generator decides how many requests are in flight.
        self.client = httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        if not self.checked:
            await self.preflight()
            self.checked = True

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def preflight(self) -> None:
        """One request before the load: the endpoint exists, takes this body and answers in shape."""
        assert self.client is not None
        documents = ["Paris is the capital of France.", "Bananas are yellow."]
        tried = f"{self.api.name} request to {self.url}"
        try:
            r = await self.client.post(self.url, json=self.api.body("capital of france", documents, self.model))
        except httpx.HTTPError as exc:
            raise ConfigError(f"{tried} failed: {type(exc).__name__}: {exc}; is the server up?") from None
        path = urlparse(self.url).path
        if r.status_code in (401, 403):
            raise ConfigError(f"{r.status_code} at {path}: the server wants a key; pass --api-key (or XBENCH_API_KEY)")
        if r.status_code in (404, 405):
            answered = await self._answering_apis(documents)
            paths = sorted({a.path for a in answered})
            hint = (f"{' and '.join(paths)} answer{'s' if len(paths) == 1 else ''} here: try "
                    f"{self._base()} --api {' or --api '.join(a.name for a in answered)}" if answered
                    else _others_at(path, self.api.name))
            raise ConfigError(f"{r.status_code} at {path}; {hint}")
        if r.status_code in WRONG_REQUEST:
            hint = "" if self.model else "; some servers need --model NAME"
            raise ConfigError(f"{r.status_code} at {path}: the server refused the {self.api.name} body: "
                              f"{r.text[:160]}{hint}")
        if not r.is_success and not busy(r):
            raise ConfigError(f"{r.status_code} at {path}: the {tried} failed before any load: {excerpt(r)}")
        if r.is_success:
            try:
                body = r.json()
            except ValueError:
                body = None
            if not self.api.answer_ok(body, len(documents)):
                raise ConfigError(f"200 at {path}, but the answer is not the {self.api.name} shape: {r.text[:160]}; "
                                  f"is it another API? (--api {', '.join(CLIENT_APIS)})")

    def _base(self) -> str:
        return self.url[: len(self.url) - len(urlparse(self.url).path)]

    async def _answering_apis(self, documents: list[str]) -> list[ClientApi]:
        """The other APIs whose path on this server answers their body in their shape."""
        assert self.client is not None
        found = []
        for api in CLIENT_APIS.values():
            if api.path == urlparse(self.url).path:
                continue
            try:
                r = await self.client.post(self._base() + api.path, json=api.body("capital of france", documents, self.model))
                if r.status_code == 200 and api.answer_ok(r.json(), len(documents)):
                    found.append(api)
            except (httpx.HTTPError, ValueError):
                continue
        return found

    def sender(self, workload: Workload, batch: int) -> Send:
        async def send(i: int) -> Sent:
            assert self.client is not None
            req = workload.request(i, batch)
            try:
                r = await self.client.post(self.url, json=self.api.body(req.query, list(req.documents), self.model))
            except httpx.TimeoutException:  # slow, not wrong: measured as an error
                raise
            except httpx.TransportError as exc:  # refused or cut off: the server is gone or rejects us
                self._count_wrong(f"{type(exc).__name__}: {exc}")
                raise
            if r.status_code != 200:
                self._count_wrong(f"HTTP {r.status_code} ({r.text[:120]})" if r.status_code in WRONG_REQUEST else None)
                return Sent(pairs=0, status=r.status_code, ok=False, error=f"HTTP {r.status_code}: {r.text[:120]}",
                            retry_after_s=retry_after_s(r), documents=len(req.documents))
            self._wrong_in_a_row = 0
            stages = {k: float(r.headers[h]) / 1000.0 for k, h in TIMING_HEADERS.items() if h in r.headers}
            tokens = int(r.headers.get("x-compute-tokens", 0) or 0)
            return Sent(pairs=len(req.documents), stages_s=stages, status=200, tokens=tokens, documents=len(req.documents))

        return send

    def _count_wrong(self, what: str | None) -> None:
        """Count an answer that says the request is wrong (or a connection cut); None resets."""
        if what is None:
            self._wrong_in_a_row = 0
            return
        self._wrong_in_a_row += 1
        if self._wrong_in_a_row >= STOP_AFTER_WRONG:
            raise StopLoad(f"stopped: the last {STOP_AFTER_WRONG} requests to {self.url} failed, the last with "
                           f"{what}; the requests themselves are wrong or the server is gone")
