"""`xbench serve --ray ADDRESS --replicas N`: the same Starlette app as replicas on Ray Serve.

Each replica builds its own app (routes, auth, errors, metrics) with `create_app` and owns its
pipeline; Ray Serve replaces a replica that dies or fails its health check. A replica loads its
model before it reports ready, so a new or replacement replica never answers "loading".

In front of them stands a `Door` (the ASGI ingress, no model, no CPUs): it hands each HTTP request
to a replica through a deployment handle and sends back the replica's answer as it was. When the
replica dies under a request, Ray's proxy would answer a plain-text 500; the door answers 503 with
Retry-After in the route's own error shape instead, so clients retry as they do on a draining
server. The extra hop costs a handle call (about a millisecond).

Metrics stay per replica: each replica also serves its own registry on a port of its node and
registers the address with a named actor; the driver keeps a Prometheus file_sd list of the live
ones (`observability/targets/xbench-replicas.json`), so every replica is scraped as its own
`instance` and the Grafana dashboard sums them. `/metrics` through the proxy answers with the
metrics of whichever replica took the request.

Plain `xbench serve` does not import this module, nor Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from omegaconf import DictConfig, OmegaConf

from xbench.config import to_dict
from xbench.errors import ErrorKind, ServiceError, XbenchError

log = logging.getLogger(__name__)

APP_NAME = "xbench"
REGISTRY_ACTOR, REGISTRY_NAMESPACE = "xbench-metrics-targets", "xbench"  # replicas live in Serve's namespace
TARGETS_REFRESH_S = 5.0


class MetricsTargets:
    """A named actor: replica -> host:port of its metrics endpoint."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}

    def register(self, replica: str, address: str) -> None:
        self.targets[replica] = address

    def forget(self, replica: str) -> None:
        self.targets.pop(replica, None)

    def all(self) -> dict[str, str]:
        return dict(self.targets)


class Replica:
    """One Ray Serve replica: the xbench app and its pipeline, loaded before it reports ready."""

    def __init__(self, cfg: dict):
        import ray
        from prometheus_client import start_http_server
        from ray import serve

        from xbench.serve.app import create_app

        self.app = create_app(OmegaConf.create(cfg))
        self.service = self.app.state.service
        self.service.models.load()  # before ready: the proxy never routes to a loading replica
        if self.service.models.load_error:
            raise RuntimeError(f"model failed to load: {self.service.models.load_error}")
        node_ip = ray.util.get_node_ip_address()  # reachable by the cluster's Prometheus, not beyond the node's network
        self.metrics_server, _ = start_http_server(0, addr=node_ip, registry=self.service.metrics.registry)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        registry = ray.get_actor(REGISTRY_ACTOR, namespace=REGISTRY_NAMESPACE)
        ray.get(registry.register.remote(self.replica_id, f"{node_ip}:{self.metrics_server.server_port}"))

    async def handle(self, request: dict) -> tuple[int, list, bytes]:
        """One HTTP request, as the door read it, through this replica's app."""
        return await call_asgi(self.app, request)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose pipeline died is replaced."""
        if not self.service.models.healthy():
            raise RuntimeError("the pipeline is not healthy")

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        server = getattr(self, "metrics_server", None)
        if server is not None:
            server.shutdown()
        if hasattr(self, "service"):
            self.service.models.close()  # what the app's lifespan does under uvicorn


async def call_asgi(app: Any, request: dict) -> tuple[int, list, bytes]:
    """Run one request through an ASGI app in this process; (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
             "method": request["method"], "path": request["path"], "raw_path": request["path"].encode(),
             "query_string": request["query_string"], "root_path": "", "headers": request["headers"],
             "client": request.get("client"), "server": None}
    pending = [{"type": "http.request", "body": request["body"], "more_body": False}]
    status, headers, body = 500, [], bytearray()

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # no disconnect: a client that leaves cancels this call instead
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, headers, bytes(body)


class Door:
    """The HTTP ingress: each request to a replica, and a 503 when the replica dies under it."""

    def __init__(self, replicas: Any):
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.replicas = replicas
        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        self.door_app = Starlette(routes=[Route("/{path:path}", self.forward, methods=methods)])

    def __serve_build_asgi_app__(self) -> Any:
        return self.door_app  # not `app`: Serve's ingress wrapper owns that name

    async def forward(self, request: Any) -> Any:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
        from starlette.responses import Response

        from xbench.serve.app import error_response

        forwarded = {"method": request.method, "path": request.url.path, "query_string": request.url.query.encode(),
                     "headers": request.headers.raw, "body": await request.body(),
                     "client": tuple(request.client) if request.client else None}
        try:
            status, headers, body = await self.replicas.handle.remote(forwarded)
        except (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            log.warning("replica lost during %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0])
            return error_response(request.url.path, ServiceError(
                ErrorKind.UNAVAILABLE, "the replica serving this request stopped before it answered, or none was "
                "left to take it; retry (Ray Serve replaces replicas that die)", headers={"Retry-After": "1"}))
        response = Response(body, status_code=status)
        response.raw_headers = headers
        return response


def deployment(cfg: DictConfig, replicas: int, max_replicas: int | None, target_ongoing: float,
               cpus_per_replica: float) -> Any:
    """The Serve application: replicas behind doors (the ASGI ingress), fixed or autoscaled."""
    from ray import serve

    scaling: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                "target_ongoing_requests": target_ongoing}}
        if max_replicas else {"num_replicas": replicas})
    model_replicas = serve.deployment(Replica, name="xbench", ray_actor_options={"num_cpus": cpus_per_replica},
                                      health_check_period_s=2, health_check_timeout_s=30,
                                      max_ongoing_requests=int(cfg.server.max_concurrent_requests), **scaling)
    # As many doors as replicas, so the door is never the narrow part; each forwards bytes only.
    door = serve.deployment(serve.ingress()(Door), name="xbench-door", ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=int(cfg.server.max_concurrent_requests) * 4, **scaling)
    return door.bind(model_replicas.bind(to_dict(cfg)))


def live_targets(registry: Any) -> dict[str, str]:
    """The registered metrics endpoints that still answer (a dead replica's is forgotten)."""
    import ray

    live = {}
    for replica, address in ray.get(registry.all.remote()).items():
        try:
            httpx.get(f"http://{address}/metrics", timeout=2).raise_for_status()
            live[replica] = address
        except httpx.HTTPError:
            registry.forget.remote(replica)
    return live


def write_targets(path: Path, targets: dict[str, str]) -> None:
    """Prometheus file_sd: one target per replica, labelled with its replica id."""
    from xbench.results.store import write_text

    groups = [{"targets": [address], "labels": {"job": "xbench", "replica": replica}}
              for replica, address in sorted(targets.items())]
    write_text(path, json.dumps(groups, indent=2) + "\n")


def serve_on_ray(cfg: DictConfig, address: str, replicas: int, max_replicas: int | None = None,
                 target_ongoing: float = 4.0, cpus_per_replica: float = 1.0,
                 targets_file: Path | None = None, stop: threading.Event | None = None) -> None:
    """Run the replicas until SIGINT/SIGTERM (or `stop`), keeping the metrics targets file fresh."""
    import ray
    from ray import serve

    if cfg.model_pool.threads_per_worker is None:  # a replica's share of its node, not the node
        cfg = OmegaConf.merge(cfg, {"model_pool": {"threads_per_worker": max(1, int(cpus_per_replica))}})
    ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    registry = ray.remote(MetricsTargets).options(name=REGISTRY_ACTOR, namespace=REGISTRY_NAMESPACE,
                                                  get_if_exists=True, lifetime="detached", num_cpus=0).remote()
    serve.start(http_options={"host": cfg.server.host, "port": int(cfg.server.port)})
    try:
        serve.run(deployment(cfg, replicas, max_replicas, target_ongoing, cpus_per_replica), name=APP_NAME,
                  route_prefix="/")
    except RuntimeError as exc:  # a replica failed to start: say so in one line, the cause is in its log
        ray.kill(registry)
        raise XbenchError(f"Ray Serve could not start the replicas: {str(exc).splitlines()[0]} "
                          "(the replica's traceback is in the cluster's logs, logs/serve/)") from None
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    log.warning("serving on Ray: http://%s:%s", cfg.server.host, cfg.server.port)
    try:
        while not stop.is_set():
            if targets_file is not None:
                write_targets(targets_file, live_targets(registry))
            stop.wait(TARGETS_REFRESH_S)
    finally:
        serve.delete(APP_NAME)
        ray.kill(registry)
        time.sleep(0.5)
