"""`xbench load`: the HTTP target of the one load generator, for any server speaking a rerank API."""

from __future__ import annotations

from urllib.parse import urlparse

import httpx

from xbench.bench.load import Send, Sent
from xbench.serve.apis import DIALECTS
from xbench.workload import Workload

TIMING_HEADERS = {"queue": "x-queue-time", "tokenize": "x-tokenization-time", "infer": "x-inference-time"}


def endpoint(url: str, api: str) -> str:
    """A bare base URL gets the API's path; a URL with a path is used as given."""
    parsed = urlparse(url)
    if parsed.path in ("", "/"):
        return url.rstrip("/") + DIALECTS[api].path
    return url


class HttpTarget:
    def __init__(self, url: str, api: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 300.0):
        self.url = endpoint(url, api)
        self.api = api
        self.dialect = DIALECTS[api]
        self.model = model
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.client: httpx.AsyncClient | None = None
        self.params = {"api": api, "url": self.url, "model_name": model}
        self.model_info = {"name": model or "(server default)", "relevance_trained": None, "source": "remote"}
        self.engine = None

    async def open(self) -> None:
        # No connection cap: the load generator decides how many requests are in flight.
        self.client = httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def sender(self, workload: Workload, batch: int) -> Send:
        async def send(i: int) -> Sent:
            assert self.client is not None
            req = workload.request(i, batch)
            r = await self.client.post(self.url, json=self.dialect.request_body(req.query, list(req.documents), self.model))
            if r.status_code != 200:
                return Sent(pairs=0, status=r.status_code, ok=False, error=f"HTTP {r.status_code}: {r.text[:120]}")
            stages = {k: float(r.headers[h]) / 1000.0 for k, h in TIMING_HEADERS.items() if h in r.headers}
            tokens = int(r.headers.get("x-compute-tokens", 0) or 0)
            return Sent(pairs=len(req.documents), stages_s=stages, status=200, tokens=tokens)

        return send
