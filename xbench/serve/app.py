"""The rerank server: Starlette routes and their handlers.

A request's way: the route picks its dialect (serve/apis/); `RerankService.rerank` checks the
key (serve/auth.py), reads the body under its size limit and time limit, lets the dialect parse
and validate it, takes an admission permit (serve/admission.py: over the request limit, or when
the queue's estimated wait is over `max_queue_wait_ms`, it is answered 429 at once), submits the
pairs to the model's pipeline (serve/registry.py) and awaits the job, racing the client's hang-up
(a hang-up cancels the job, whose pairs are then dropped before they cost compute); the dialect
renders the scores or the error. Routes: POST /v1/rerank, /v2/rerank, /rerank; GET /health,
/info, /metrics.

Shutdown (SIGTERM or Ctrl-C) drains: new requests are answered 503 with Retry-After, every
response carries `Connection: close`, and requests in flight are scored; those still unscored
when `shutdown_grace_s` is nearly spent are answered 503 and their pairs dropped, so the process
exits within the grace period and no accepted request goes unanswered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import numpy as np
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import xbench
from xbench.core.pipeline import Pipeline, sigmoid
from xbench.core.request import RerankJob, RerankResult
from xbench.errors import ErrorKind, RequestCancelled, ServiceError
from xbench.serve.admission import Admission
from xbench.serve.apis import DIALECTS, Dialect, RerankQuery
from xbench.serve.auth import SERVER_API_KEY_ENV, Auth
from xbench.serve.metrics import Metrics
from xbench.serve.registry import Models
from xbench.workload import without_lone_surrogates

log = logging.getLogger(__name__)

LINGER_S = 0.5  # after the drain: time for connections accepted just before it ended to be answered


class RerankService:
    """The route handlers."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.server = cfg.server
        self.metrics = Metrics()
        self.models = Models(cfg, self.metrics)
        self.auth = Auth(self.server.api_key or os.environ.get(SERVER_API_KEY_ENV) or None)
        self.admission = Admission(int(self.server.max_concurrent_requests),
                                   float(self.server.max_queue_wait_ms) / 1000.0, self.metrics)
        self.jobs: set[RerankJob] = set()  # in flight: answered 503 if shutdown's grace runs out

    # -- the rerank routes ------------------------------------------------------------------
    async def rerank(self, request: Request, dialect: Dialect) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            self.auth.check(request)
            self.models.require_ready()
            # Shed before reading the body when even the least busy model's queue is over the
            # bound: a 429 costs no parsing while the model is saturating the CPU.
            self.admission.check(self.models.least_busy().backlog)
            query = dialect.parse(await self._read_json(request), int(self.server.max_client_batch_size),
                                  int(self.server.max_query_chars))
            name, pipe = self.models.get(query.model)
            async with self.admission.permit(pipe.backlog):
                response = await self._rerank(request, dialect, query, name, pipe)
            status = response.status_code
            return response
        except ServiceError as exc:
            response = dialect.error_response(exc)
            status = response.status_code
            return response
        except ClientDisconnect:
            status = ErrorKind.CANCELLED.status
            return Response(status_code=status)
        finally:
            self.metrics.requests.labels(dialect.path, str(status)).inc()
            self.metrics.request_duration.labels(dialect.path, str(status)).observe(time.perf_counter() - start)

    async def _rerank(self, request: Request, dialect: Dialect, q: RerankQuery, name: str, pipe: Pipeline) -> Response:
        docs = q.documents
        if q.max_tokens_per_doc:  # tokenizing is CPU work: off the event loop, which keeps serving others
            docs = await asyncio.to_thread(pipe.tokenizers.cut_texts, docs, q.max_tokens_per_doc)
        job = pipe.submit([(q.query, d) for d in docs], truncate=q.truncate, direction=q.truncation_direction)
        self.jobs.add(job)
        try:
            result = await self._scores_unless_hung_up(request, job)
        finally:
            self.jobs.discard(job)
        for stage, seconds in result.stages_s.items():
            self.metrics.stage_duration.labels(stage).observe(seconds)
        self.metrics.pairs.inc(len(docs))
        self.metrics.tokens.inc(result.total_tokens)
        scores = result.logits if q.raw_scores else sigmoid(result.logits)
        order = np.argsort(-scores, kind="stable")[: q.top_n]
        return JSONResponse(dialect.render(q, name, result, scores, order), headers=timing_headers(result))

    async def _scores_unless_hung_up(self, request: Request, job: RerankJob) -> RerankResult:
        """Await the job; if the client hangs up first, cancel it (its pairs are dropped)."""
        scoring = asyncio.ensure_future(job.wait())
        hang_up = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({scoring, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
        if not scoring.done():
            scoring.cancel()  # cancels the job
            raise ClientDisconnect()
        try:
            return scoring.result()
        except RequestCancelled:
            raise ClientDisconnect() from None
        except ServiceError:
            raise
        except Exception as exc:
            log.exception("scoring failed")
            raise ServiceError(ErrorKind.INTERNAL, f"backend error: {type(exc).__name__}: {exc}") from exc

    async def _read_json(self, request: Request) -> Any:
        limit = int(self.server.max_body_bytes)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ServiceError(ErrorKind.TOO_LARGE, f"request body of {declared} bytes is over the limit of {limit} bytes")
        timeout = float(self.server.body_timeout_s)
        try:  # a body trickled byte by byte would hold the connection
            body = await asyncio.wait_for(_read_body(request, limit), timeout)
        except asyncio.TimeoutError:
            raise ServiceError(ErrorKind.TIMEOUT, f"request body not received within body_timeout_s={timeout:g}",
                               headers={"Connection": "close"}) from None
        try:
            return without_lone_surrogates(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServiceError(ErrorKind.MALFORMED, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ServiceError(ErrorKind.MALFORMED, "request body is not valid JSON: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer past Python's 4,300-digit limit
            raise ServiceError(ErrorKind.MALFORMED, f"request body is not valid JSON: {str(exc)[:120]}") from None

    # -- the other routes -------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.admission.draining:  # load balancers stop routing here
            return JSONResponse({"status": "draining"}, status_code=503)
        if self.models.healthy():
            return JSONResponse({"status": "ok"})
        error = self.models.load_error or (self.models.fault() if self.models.ready else None)
        return JSONResponse({"status": "failed" if error else "loading", "error": error}, status_code=503)

    async def info(self, request: Request) -> Response:
        self.auth.check(request)
        models = []
        for name, p in self.models.pipelines().items():
            d = p.describe()
            models.append({"model": name, "backend": d["backend"], "device": d["device"], "precision": d["precision"],
                           "max_input_length": p.max_length, "model_workers": d["model_workers"],
                           "model_mode": d["model_mode"], "tokenizer_workers": d["tokenizer_workers"],
                           "packed": d["packed"], "planner": d["planner"], "batch_cost_model": d["batch_cost_model"],
                           "relevance_trained": p.model.relevance_trained, "note": p.model.note,
                           "scoring": p.model.recipe.describe()})
        first = models[0] if models else {}
        return JSONResponse({
            "model": first.get("model"), "backend": first.get("backend"), "precision": first.get("precision"),
            "device": first.get("device"), "relevance_trained": first.get("relevance_trained"),
            "scoring": first.get("scoring"),
            "packed": first.get("packed"), "max_input_length": first.get("max_input_length"),
            "max_client_batch_size": self.server.max_client_batch_size,
            "max_batch_tokens": self.cfg.batching.max_batch_tokens,
            "max_batch_size": self.cfg.batching.max_batch_size,
            "max_concurrent_requests": self.server.max_concurrent_requests,
            "max_queue_wait_ms": self.server.max_queue_wait_ms,
            "max_query_chars": self.server.max_query_chars,
            "tokenizer_workers": first.get("tokenizer_workers"),
            "model_workers": first.get("model_workers"),
            "models": models, "ready": self.models.ready, "version": xbench.__version__,
        })

    async def prometheus(self, request: Request) -> Response:
        self.auth.check(request)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- shutdown -----------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Stop admitting; answer what is still unscored 503 before the grace period ends."""
        if self.admission.draining:
            return
        self.admission.draining = True
        grace = float(self.server.shutdown_grace_s)
        # Leave time for the running batch (up to a second or so on a CPU) and the exit.
        asyncio.get_running_loop().call_later(grace - min(5.0, grace / 2), self._abandon_unscored)
        log.info("draining: %d requests in flight, %.0f s grace", self.admission.in_flight, grace)

    @property
    def drained(self) -> bool:
        return self.admission.draining and self.admission.in_flight == 0

    def _abandon_unscored(self) -> None:
        grace = self.server.shutdown_grace_s
        for job in list(self.jobs):
            job.fail(ServiceError(ErrorKind.UNAVAILABLE, f"the server shut down before this request was scored "
                                  f"(shutdown_grace_s={grace}); retry on another replica", headers={"Retry-After": "1"}))


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(ErrorKind.TOO_LARGE, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up (the body is already read: the next ASGI message is the
    disconnect, delivered when it happens, not polled for)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timing_headers(result: RerankResult) -> dict[str, str]:
    ms = {k: v * 1000.0 for k, v in result.stages_s.items()}
    return {"x-queue-time": f"{ms.get('queue', 0):.3f}", "x-tokenization-time": f"{ms.get('tokenize', 0):.3f}",
            "x-inference-time": f"{ms.get('infer', 0):.3f}", "x-compute-time": f"{sum(ms.values()):.3f}",
            "x-compute-tokens": str(result.total_tokens)}


def error_response(path: str, err: ServiceError) -> JSONResponse:
    """An error in the shape of the dialect that serves `path` (TEI's elsewhere)."""
    return next((d for d in DIALECTS.values() if d.path == path), DIALECTS["tei"]).error_response(err)


class CloseWhileDraining:
    """ASGI middleware: while the server drains, every response says `Connection: close`, so a
    keep-alive client opens its next request elsewhere instead of finding the socket closed."""

    def __init__(self, app: Any, service: RerankService):
        self.app, self.service = app, service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start" and self.service.admission.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing if scope["type"] == "http" else send)


def create_app(cfg: DictConfig) -> Starlette:
    service = RerankService(cfg)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=service.models.load, name="xbench-loader", daemon=True).start()
        yield
        # uvicorn has stopped accepting and finished in-flight requests by now.
        await asyncio.get_running_loop().run_in_executor(None, service.models.close)

    def rerank_route(dialect: Dialect) -> Route:
        async def endpoint(request: Request) -> Response:
            return await service.rerank(request, dialect)

        return Route(dialect.path, endpoint, methods=["POST"])

    def guarded(handler: Any) -> Any:
        """/info and /metrics: a wrong key is answered in TEI's error shape."""
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return DIALECTS["tei"].error_response(exc)

        return endpoint

    async def route_error(request: Request, exc: Exception) -> Response:
        """404 and 405 in JSON, in the shape of the dialect whose path it was (TEI's elsewhere)."""
        assert isinstance(exc, HTTPException)
        kind = ErrorKind.METHOD_NOT_ALLOWED if exc.status_code == 405 else ErrorKind.NOT_FOUND
        err = ServiceError(kind, f"{request.method} {request.url.path}: {exc.detail}", headers=dict(exc.headers or {}))
        return error_response(request.url.path, err)

    app = Starlette(routes=[
        *(rerank_route(d) for d in DIALECTS.values()),
        Route("/health", service.health, methods=["GET"]),
        Route("/info", guarded(service.info), methods=["GET"]),
        Route("/metrics", guarded(service.prometheus), methods=["GET"]),
    ], lifespan=lifespan, exception_handlers={404: route_error, 405: route_error},
        middleware=[Middleware(CloseWhileDraining, service=service)])
    app.state.service = service
    return app


def serve(cfg: DictConfig) -> None:
    import contextlib

    import uvicorn

    from xbench.serve.protocol import with_header_timeout

    app = create_app(cfg)
    service: RerankService = app.state.service

    class Server(uvicorn.Server):
        """uvicorn, with a drain before its own shutdown: the first SIGTERM/SIGINT starts the
        service's drain (the listener stays open and answers 503). Once no rerank request is in
        flight the listener closes (new connections are refused, so a client knows nothing was
        sent), connections accepted just before get LINGER_S to be answered 503, and then
        uvicorn's shutdown closes the rest. A second signal skips the rest of the drain; a third
        Ctrl-C forces the exit."""

        _linger_until: float | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if service.admission.draining or self.should_exit or self._loop is None:
                super().handle_exit(sig, frame)
            else:
                self._loop.call_soon_threadsafe(service.begin_drain)

        async def on_tick(self, counter: int) -> bool:
            if service.drained and not self.should_exit:
                if self._linger_until is None:
                    for listener in self.servers:
                        listener.close()
                    self._linger_until = time.monotonic() + LINGER_S
                elif time.monotonic() >= self._linger_until:
                    self.should_exit = True
            return await super().on_tick(counter)

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[override]
            with super().capture_signals():
                yield
                # SIGTERM/SIGINT ended a graceful drain: that is a clean exit (0), so do not
                # re-raise the signal the way uvicorn does by default.
                self._captured_signals.clear()

    server = cfg.server
    config = uvicorn.Config(app, host=server.host, port=int(server.port), log_level="warning", access_log=False,
                            http=with_header_timeout(float(server.header_timeout_s)),
                            limit_concurrency=int(server.max_connections),
                            timeout_graceful_shutdown=max(1, int(server.shutdown_grace_s) // 4))
    Server(config).run()
    # Everything the server owns is closed. Skip the interpreter's own teardown: with torch
    # loaded it takes over a second here, which would come out of the shutdown grace period.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
