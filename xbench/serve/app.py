"""The rerank server: Starlette routes over one Pipeline per served model instance.

Routes: POST /v1/rerank (Cohere v1 / Jina), POST /v2/rerank (Cohere v2), POST /rerank (TEI),
GET /health, /info, /metrics. Every error is answered in the shape its route's clients parse,
with one status per kind of error; a bad request never reaches the model workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import numpy as np
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tokenizers import Tokenizer

import xbench
from xbench.config import DEFAULT_MODEL
from xbench.core.batcher import ModelBatch, RequestCancelled, RerankResult
from xbench.core.pipeline import InputTooLong, Pipeline, sigmoid
from xbench.serve.metrics import Metrics
from xbench.serve.schemas import ApiError, RerankQuery, parse

log = logging.getLogger(__name__)
API_KEY_ENV = "XBENCH_API_KEY"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 413: "request_too_large",
               422: "validation_error", 429: "overloaded", 499: "client_closed_request", 500: "backend_error",
               503: "not_ready"}
DISCONNECT_POLL_S = 0.05


class RerankService:
    """Owns the pipelines and the metrics; answers the routes."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.server = cfg.server
        self.api_key = self.server.api_key or os.environ.get(API_KEY_ENV) or None
        self.metrics = Metrics()
        self.pipelines: dict[str, Pipeline] = {}
        self.ready = False
        self.load_error: str | None = None
        self.in_flight = 0
        self._doc_tokenizers: dict[str, Tokenizer] = {}

    # -- lifecycle ----------------------------------------------------------------------
    def load(self) -> None:
        """Load and warm every instance (on a thread, so /health can answer 503 meanwhile)."""
        try:
            for i, inst in enumerate(self.cfg.model_pool.instances):
                pipe = Pipeline(self.cfg, i, observe_batch=self._observe_batch).start()
                self.pipelines[inst.name] = pipe
                d = pipe.describe()
                self.metrics.model_info.labels(inst.name, d["backend"], d["device"], d["precision"]).set(1)
            first = next(iter(self.pipelines.values()))
            self.metrics.watch_queue(lambda: sum(p.batcher.queue_size for p in self.pipelines.values()))
            self.metrics.watch_efficiency(self._padding_efficiency)
            self._default = first
            self.ready = True
            log.info("serving %s", ", ".join(self.pipelines))
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")

    def close(self) -> None:
        self.ready = False
        for p in self.pipelines.values():
            p.close()

    def _observe_batch(self, batch: ModelBatch, seconds: float) -> None:
        self.metrics.batch_size.observe(batch.rows)
        self.metrics.batch_tokens.observe(batch.padded_tokens)
        self.metrics.batch_longest.observe(batch.input_ids.shape[1])
        self.metrics.real_tokens.inc(batch.real_tokens)
        self.metrics.padded_tokens.inc(batch.padded_tokens)
        self.metrics.batch_duration.observe(seconds)

    def _padding_efficiency(self) -> float:
        counts = [p.models.token_counts() for p in list(self.pipelines.values())]
        computed = sum(c.computed_tokens for c in counts)
        return sum(c.real_tokens for c in counts) / computed if computed else 1.0

    # -- checks ---------------------------------------------------------------------------
    def healthy(self) -> bool:
        return self.ready and all(p.models.healthy() for p in self.pipelines.values())

    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", kind="Unauthorized")

    async def read_json(self, request: Request) -> Any:
        limit = int(self.server.max_body_bytes)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes", kind="Validation")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", kind="Validation")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", kind="Validation") from None

    def pipeline_for(self, model: str | None) -> tuple[str, Pipeline]:
        if model is None:
            return next(iter(self.pipelines.items()))
        if model in self.pipelines:
            return model, self.pipelines[model]
        if model == "default" and DEFAULT_MODEL in self.pipelines:
            return DEFAULT_MODEL, self.pipelines[DEFAULT_MODEL]
        raise ApiError(400, f"model {model!r} is not served here; served: {', '.join(self.pipelines)}",
                       param="model")

    def truncate_documents(self, pipe: Pipeline, docs: list[str], max_tokens: int) -> list[str]:
        """Cohere v2's max_tokens_per_doc: cut each document's text after its first N tokens."""
        tok = self._doc_tokenizers.get(pipe.instance.name)
        if tok is None:
            tok = self._doc_tokenizers[pipe.instance.name] = Tokenizer.from_str(pipe.tokenizers.tokenizer_json)
            tok.no_truncation()
        out = []
        for enc, text in zip(tok.encode_batch(docs, add_special_tokens=False), docs):
            out.append(text[: enc.offsets[max_tokens - 1][1]] if len(enc.ids) > max_tokens else text)
        return out

    # -- the rerank routes ------------------------------------------------------------------
    async def rerank(self, request: Request, api: str) -> Response:
        route = request.url.path
        start = time.perf_counter()
        status = 500
        try:
            self.check_auth(request)
            if not self.ready:
                raise ApiError(503, "the model is loading" if not self.load_error else f"model failed to load: {self.load_error}",
                               kind="Unhealthy")
            if self.in_flight >= int(self.server.max_concurrent_requests):
                raise ApiError(429, f"{self.in_flight} requests in flight: the limit is max_concurrent_requests="
                               f"{self.server.max_concurrent_requests}; retry shortly", kind="Overloaded",
                               headers={"Retry-After": "1"})
            self.in_flight += 1
            self.metrics.in_flight.inc()
            try:
                response = await self._rerank(request, api)
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
            status = response.status_code
            return response
        except ApiError as exc:
            status = exc.status
            return error_response(api, exc)
        except ClientDisconnect:
            status = 499
            return Response(status_code=499)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - start)

    async def _rerank(self, request: Request, api: str) -> Response:
        q = parse(api, await self.read_json(request), int(self.server.max_client_batch_size))
        name, pipe = self.pipeline_for(q.model)
        docs = q.documents
        if q.max_tokens_per_doc:
            docs = self.truncate_documents(pipe, docs, q.max_tokens_per_doc)
        future = pipe.submit([(q.query, d) for d in docs], truncate=q.truncate, direction=q.truncation_direction)
        result = await self._wait(request, future)
        for stage, seconds in result.stages_s.items():
            self.metrics.stage_duration.labels(stage).observe(seconds)
        self.metrics.pairs.inc(len(docs))
        self.metrics.tokens.inc(result.total_tokens)
        return JSONResponse(render(api, q, name, result), headers=timing_headers(result))

    async def _wait(self, request: Request, future: Future) -> RerankResult:
        """Await the scores; if the client hangs up first, drop its pairs before they cost compute."""
        waiter = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                try:
                    return waiter.result()
                except RequestCancelled:
                    raise ClientDisconnect() from None
                except InputTooLong as exc:  # rejected once tokenized, before any compute
                    raise ApiError(422, str(exc), param="texts") from None
                except Exception as exc:
                    log.exception("scoring failed")
                    raise ApiError(500, f"backend error: {type(exc).__name__}: {exc}", kind="Backend") from exc
            if await request.is_disconnected():
                Pipeline.cancel(future)
                raise ClientDisconnect()

    # -- the other routes -------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading" if not self.load_error else "failed", "error": self.load_error},
                            status_code=503)

    async def info(self, request: Request) -> Response:
        try:
            self.check_auth(request)
        except ApiError as exc:
            return error_response("tei", exc)
        models = []
        for name, p in self.pipelines.items():
            d = p.describe()
            models.append({"model": name, "backend": d["backend"], "device": d["device"], "precision": d["precision"],
                           "max_input_length": p.max_length, "model_workers": d["model_workers"],
                           "packed": d["packed"], "planner": d["planner"], "batch_cost_model": d["batch_cost_model"],
                           "relevance_trained": p.model.relevance_trained, "note": p.model.note})
        first = models[0] if models else {}
        return JSONResponse({
            "model": first.get("model"), "backend": first.get("backend"), "precision": first.get("precision"),
            "device": first.get("device"), "relevance_trained": first.get("relevance_trained"),
            "packed": first.get("packed"),
            "max_input_length": first.get("max_input_length"),
            "max_client_batch_size": self.server.max_client_batch_size,
            "max_batch_tokens": self.cfg.batching.max_batch_tokens,
            "max_batch_size": self.cfg.batching.max_batch_size,
            "max_concurrent_requests": self.server.max_concurrent_requests,
            "tokenizer_workers": self.cfg.tokenizer_pool.workers,
            "model_workers": self.cfg.model_pool.workers,
            "models": models, "ready": self.ready, "version": xbench.__version__,
        })

    async def prometheus(self, request: Request) -> Response:
        try:
            self.check_auth(request)
        except ApiError as exc:
            return error_response("tei", exc)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def render(api: str, q: RerankQuery, model: str, result: RerankResult) -> Any:
    scores = result.logits if q.raw_scores else sigmoid(result.logits)
    order = np.argsort(-scores, kind="stable")
    if q.top_n is not None:
        order = order[: q.top_n]
    if api == "tei":
        return [{"index": int(i), "score": float(scores[i]), **({"text": q.documents[i]} if q.return_documents else {})}
                for i in order]
    results = [{"index": int(i), "relevance_score": float(scores[i]),
                **({"document": {"text": q.documents[i]}} if q.return_documents else {})} for i in order]
    return {"id": str(uuid.uuid4()), "model": model, "results": results,
            "usage": {"total_tokens": result.total_tokens},
            "meta": {"api_version": {"version": "2" if api == "cohere-v2" else "1"},
                     "billed_units": {"search_units": 1}}}


def timing_headers(result: RerankResult) -> dict[str, str]:
    ms = {k: v * 1000.0 for k, v in result.stages_s.items()}
    return {"x-queue-time": f"{ms.get('queue', 0):.3f}", "x-tokenization-time": f"{ms.get('tokenize', 0):.3f}",
            "x-inference-time": f"{ms.get('infer', 0):.3f}", "x-compute-time": f"{sum(ms.values()):.3f}",
            "x-compute-tokens": str(result.total_tokens)}


def error_response(api: str, exc: ApiError) -> JSONResponse:
    if api == "tei":
        body: Any = {"error": exc.message, "error_type": exc.kind}
    else:
        body = {"error": {"message": exc.message, "type": ERROR_TYPES.get(exc.status, "error"), "param": exc.param}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def create_app(cfg: DictConfig, load_in_background: bool = True) -> Starlette:
    service = RerankService(cfg)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = threading.Thread(target=service.load, name="xbench-loader", daemon=True)
        loader.start()
        if not load_in_background:
            await asyncio.get_running_loop().run_in_executor(None, loader.join)
        yield
        # uvicorn has stopped accepting and finished in-flight requests by now.
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    async def v1(request: Request) -> Response:
        return await service.rerank(request, "cohere")

    async def v2(request: Request) -> Response:
        return await service.rerank(request, "cohere-v2")

    async def tei(request: Request) -> Response:
        return await service.rerank(request, "tei")

    app = Starlette(routes=[
        Route("/v1/rerank", v1, methods=["POST"]),
        Route("/v2/rerank", v2, methods=["POST"]),
        Route("/rerank", tei, methods=["POST"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/info", service.info, methods=["GET"]),
        Route("/metrics", service.prometheus, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.service = service
    return app


def serve(cfg: DictConfig) -> None:
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[override]
            with super().capture_signals():
                yield
                # SIGTERM/SIGINT ended a graceful drain: that is a clean exit (0), so do not
                # re-raise the signal the way uvicorn does by default.
                self._captured_signals.clear()

    config = uvicorn.Config(create_app(cfg), host=cfg.server.host, port=int(cfg.server.port), log_level="warning",
                            timeout_graceful_shutdown=30, access_log=False)
    Server(config).run()
