"""The served models' lifecycle: one Pipeline per model instance, loaded on a thread at start-up
(so /health answers 503 meanwhile), looked up by name, observed for metrics, closed at shutdown."""

from __future__ import annotations

import logging
import threading

from omegaconf import DictConfig

from xbench.config import DEFAULT_MODEL
from xbench.core.batcher import ModelBatch
from xbench.core.pipeline import Pipeline
from xbench.errors import ErrorKind, ServiceError
from xbench.serve.metrics import Metrics

log = logging.getLogger(__name__)


class Models:
    """The served pipelines: loaded on a thread at start-up (so /health answers 503 meanwhile),
    looked up by name, closed at shutdown."""

    def __init__(self, cfg: DictConfig, metrics: Metrics):
        self.cfg = cfg
        self.metrics = metrics
        self._pipelines: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self.ready = False
        self._loading = False
        self.load_error: str | None = None

    def load(self) -> None:
        """Load every configured pipeline, once (a Ray Serve replica loads before its lifespan runs)."""
        with self._lock:
            if self._loading:
                return
            self._loading = True
        try:
            for i, inst in enumerate(self.cfg.model_pool.instances):
                pipe = Pipeline.from_config(self.cfg, i, observe_batch=self._observe_batch).start()
                with self._lock:
                    self._pipelines[inst.name] = pipe
                d = pipe.describe()
                self.metrics.model_info.labels(inst.name, d["backend"], d["device"], d["precision"]).set(1)
            self.metrics.watch_queue(lambda: sum(p.batcher.queue_size for p in self.pipelines().values()))
            self.metrics.watch_queue_wait(lambda: max(p.backlog.wait_s() for p in self.pipelines().values()))
            self.metrics.watch_efficiency(self._padding_efficiency)
            self.ready = True
            log.info("serving %s", ", ".join(self._pipelines))
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")

    def pipelines(self) -> dict[str, Pipeline]:
        """A snapshot: safe to iterate while the loader adds models."""
        with self._lock:
            return dict(self._pipelines)

    def least_busy(self) -> Pipeline:
        """The served pipeline whose queue would keep a new request waiting least."""
        return min(self.pipelines().values(), key=lambda p: p.backlog.wait_s())

    def healthy(self) -> bool:
        return self.ready and self.fault() is None

    def fault(self) -> str | None:
        """The first served pipeline's reason it cannot score, if any."""
        return next((f for p in self.pipelines().values() if (f := p.fault())), None)

    def require_ready(self) -> None:
        if not self.ready:
            message = "the model is loading" if not self.load_error else f"model failed to load: {self.load_error}"
            raise ServiceError(ErrorKind.UNAVAILABLE, message)

    def get(self, model: str | None) -> tuple[str, Pipeline]:
        served = self.pipelines()
        if model is None:
            return next(iter(served.items()))
        if model in served:
            return model, served[model]
        if model == "default" and DEFAULT_MODEL in served:
            return DEFAULT_MODEL, served[DEFAULT_MODEL]
        raise ServiceError(ErrorKind.MALFORMED, f"model {model!r} is not served here; served: {', '.join(served)}",
                           param="model")

    def close(self) -> None:
        self.ready = False
        for p in self.pipelines().values():
            p.close()

    def _observe_batch(self, batch: ModelBatch, seconds: float) -> None:
        m = self.metrics
        m.batch_size.observe(batch.rows)
        m.batch_tokens.observe(batch.padded_tokens)
        m.batch_longest.observe(batch.longest)
        m.real_tokens.inc(batch.real_tokens)
        m.padded_tokens.inc(batch.padded_tokens)
        m.batch_duration.observe(seconds)

    def _padding_efficiency(self) -> float:
        counts = [p.models.token_counts() for p in self.pipelines().values()]
        computed = sum(c.computed_tokens for c in counts)
        return sum(c.real_tokens for c in counts) / computed if computed else 1.0
