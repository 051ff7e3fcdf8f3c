"""Pipeline: TokenizerPool -> Batcher -> ModelPool for one model instance.

What pipeline-bench measures and what `serve` runs. `submit` returns a future that resolves
to the request's scores in its own order; tokenizing one request overlaps inference of
others because the pools run on their own threads.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig

from xbench.backends import Backend, normalize
from xbench.core import cost_model
from xbench.core.batcher import Batcher, ModelBatch, PendingRequest, RerankResult
from xbench.core.model_pool import ModelPool
from xbench.core.tokenizer_pool import Encoded, Pair, TokenizerPool, load_tokenizer
from xbench.models import ResolvedModel, cache_dir, resolve_model

WARMUP_SHAPES = ((1, 16), (8, 64), (32, 128))


def warmup_backend(backend: Backend) -> None:
    """Run a few shapes once so lazy initialisation is not timed."""
    for rows, seq in WARMUP_SHAPES:
        ids = np.full((rows, seq), 1000, dtype=np.int64)
        backend.forward(ids, np.ones_like(ids), np.zeros_like(ids))


class InputTooLong(ValueError):
    """Pairs longer than the model's max_length, sent with truncation off."""

    def __init__(self, count: int, max_length: int):
        super().__init__(f"{count} input(s) are longer than max_input_length={max_length} tokens and truncate is false")


class Pipeline:
    def __init__(self, cfg: DictConfig, instance_index: int = 0,
                 observe_batch: Callable[[ModelBatch, float], None] | None = None):
        self.cfg = cfg
        self.instance = cfg.model_pool.instances[instance_index]
        self.model: ResolvedModel = resolve_model(self.instance.name, self.instance.trust_remote_code)
        self.max_length = min(int(self.instance.max_length), self.model.max_position_embeddings)
        tp = cfg.tokenizer_pool
        self.tokenizers = TokenizerPool(load_tokenizer(self.model.path, self.max_length),
                                        workers=tp.workers, parallelism=tp.parallelism, mode=tp.mode)
        self.batcher = Batcher(cfg.batching)
        self.models = ModelPool(self.instance, str(self.model.path), cfg.model_pool.workers,
                                cfg.model_pool.threads_per_worker, self.batcher.next_batch, observe_batch)
        self.started = False

    def start(self) -> "Pipeline":
        self.tokenizers.warmup()
        self.models.start(warmup=warmup_backend, calibrate=self._calibrate if self.batcher.cost else None)
        self.started = True
        return self

    def _calibrate(self, backend: Backend) -> None:
        """Fit the batch planner's cost model to this backend (cached per machine, model,
        backend, precision and threads): a few timed shapes, once."""
        from xbench.results.store import environment

        def forward(rows: int, length: int) -> None:
            ids = np.full((rows, min(length, self.max_length)), 1000, dtype=np.int64)
            backend.forward(ids, np.ones_like(ids), np.zeros_like(ids))

        env = environment()
        weights = self.model.path / "model.safetensors"
        stat = weights.stat() if weights.is_file() else None
        backend_name, device = normalize(self.instance.backend, self.instance.device)
        key = {"cpu": env["cpu"], "cores": env["cores"], "gpu": env["gpu"], "torch": env["torch"],
               "onnxruntime": env["onnxruntime"], "model": str(self.model.path),
               "weights": [stat.st_size, stat.st_mtime_ns] if stat else None, "backend": backend_name,
               "device": device, "precision": self.instance.quantization, "threads": self.models.threads,
               "packed": self.models.packed, "max_length": self.max_length}
        fitted = cost_model.load_or_calibrate(key, forward, cache_dir() / "costs")
        self.batcher.cost = dataclasses.replace(fitted, packed=self.models.packed,
                                                varlen_attention=bool(getattr(backend, "varlen_attention", False)))

    # -- requests -------------------------------------------------------------------------
    def submit(self, pairs: list[Pair], truncate: bool = True, direction: str = "right") -> Future[RerankResult]:
        """Tokenize, batch and score pairs; the future holds logits in the pairs' order. Pairs
        longer than max_length are cut from the `direction` side or, with truncate=False, fail
        the request with InputTooLong once tokenized, before they reach the model."""
        submitted = time.perf_counter()
        result: Future[RerankResult] = Future()
        self.batcher.expect()
        tokenizing = self.tokenizers.submit(pairs, direction)

        def tokenized(f: Future[Encoded]) -> None:
            exc = f.exception()
            if exc is None and not truncate and f.result().truncated:
                exc = InputTooLong(f.result().truncated, self.max_length)
            if exc is not None:
                self.batcher.arrived_empty()
                result.set_exception(exc)
                return
            enc = f.result()
            self._enqueue(enc, submitted, time.perf_counter() - enc.tokenize_s, result, expected=True)

        tokenizing.add_done_callback(tokenized)
        return result

    def submit_encoded(self, encoded: Encoded) -> Future[RerankResult]:
        """Score pairs that are already tokenized (infer-bench: the model stage alone)."""
        now = time.perf_counter()
        result: Future[RerankResult] = Future()
        self._enqueue(dataclasses.replace(encoded, tokenize_s=0.0), now, now, result, expected=False)
        return result

    @staticmethod
    def cancel(result: Future) -> None:
        """The client went away: drop its pairs before they cost compute."""
        result.xbench_cancelled = True  # type: ignore[attr-defined]
        pending = getattr(result, "xbench_request", None)
        if pending is not None:
            pending.cancel()

    def _enqueue(self, enc: Encoded, submitted: float, tokenize_started: float,
                 result: Future, expected: bool) -> PendingRequest:
        request = PendingRequest(enc, submitted=submitted, tokenize_started=tokenize_started, future=result)
        result.xbench_request = request  # type: ignore[attr-defined]
        if getattr(result, "xbench_cancelled", False):
            request.cancel()
            if expected:
                self.batcher.arrived_empty()
            return request
        if not enc.ids:  # nothing to score
            request.deliver([], np.empty(0, np.float32), time.perf_counter())
            if expected:
                self.batcher.arrived_empty()
            return request
        self.batcher.put(request, expected=expected)
        return request

    # -- description and lifecycle -----------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        backend, device = normalize(self.instance.backend, self.instance.device)
        return {
            "backend": backend,
            "device": device,
            "precision": self.instance.quantization,
            "max_length": self.max_length,
            "model_workers": self.models.workers,
            "threads_per_worker": self.models.threads,
            "tokenizer_workers": self.tokenizers.workers,
            "tokenizer_mode": self.tokenizers.mode,
            "parallelism": self.tokenizers.parallelism,
            "engine": self.models.backend_info,
            "packed": self.models.packed,
            "planner": self.cfg.batching.planner,
            "batch_cost_model": self.batcher.cost.describe() if self.batcher.cost else None,
        }

    def close(self) -> None:
        self.batcher.close()
        self.models.join()
        self.tokenizers.close()

    def __enter__(self) -> "Pipeline":
        return self.start() if not self.started else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


__all__ = ["InputTooLong", "Pipeline", "RerankResult", "sigmoid", "warmup_backend"]
