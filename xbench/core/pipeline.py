"""Pipeline: TokenizerPool -> Batcher -> ModelPool for one model instance.

What pipeline-bench measures and what `serve` runs. `submit` returns a `RerankJob` (core/request.py)
that ends with the pairs' scores in their own order; tokenizing one request overlaps inference of
others because the pools run on their own threads. A pipeline is built from what it needs (a
resolved model, its tokenizer pool, the batching config and a backend factory);
`Pipeline.from_config` does that for one model instance of a composed config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig

from xbench.backends import Backend, check_recipe, create_backend, normalize
from xbench.config import BatchingConfig
from xbench.core import cost_model
from xbench.core.backlog import Backlog
from xbench.core.batcher import Batcher, ModelBatch
from xbench.core.memory import MemoryReleaser
from xbench.core.model_pool import BackendFactory, ModelPool, default_mode, default_workers
from xbench.core.request import RerankJob, RerankResult
from xbench.core.tokenizer_pool import Encoded, Pair, TokenizerPool
from xbench.errors import InputTooLong
from xbench.checkpoints import ResolvedModel, cache_dir, effective_max_length, resolve_instance

WARMUP_SHAPES = ((1, 16), (8, 64), (32, 128))


def warmup_backend(backend: Backend) -> None:
    """Run a few shapes once so lazy initialisation is not timed."""
    for rows, seq in WARMUP_SHAPES:
        ids = np.full((rows, seq), 1000, dtype=np.int64)
        backend.forward(ids, np.ones_like(ids), np.zeros_like(ids))


class Pipeline:
    def __init__(self, model: ResolvedModel, tokenizers: TokenizerPool, batching: BatchingConfig,
                 backend: BackendFactory, describe_backend: dict[str, Any], workers: int = 1,
                 threads_per_worker: int | None = None,
                 observe_batch: Callable[[ModelBatch, float], None] | None = None, model_mode: str = "thread"):
        self.model = model
        self.max_length = tokenizers.max_length
        self.tokenizers = tokenizers
        self.planner = batching.planner
        self.batcher = Batcher(batching)
        self.backlog = Backlog(workers)
        self._observe_batch = observe_batch
        self.memory = MemoryReleaser()
        self.models = ModelPool(backend, workers, threads_per_worker, self.batcher.next_batch, self._observed,
                                self._after_batch, model_mode)
        self._backend_params = describe_backend  # backend, device, precision: what the factory builds
        self.started = False

    @classmethod
    def from_config(cls, cfg: DictConfig, instance_index: int = 0,
                    observe_batch: Callable[[ModelBatch, float], None] | None = None) -> "Pipeline":
        """The pipeline of model instance `instance_index` of a composed config."""
        inst = cfg.model_pool.instances[instance_index]
        key = f"model_pool.instances.{instance_index}"
        model = resolve_instance(inst, key)
        check_recipe(inst, model.recipe, key, json.loads((model.path / "config.json").read_text()))
        backend, device = normalize(inst.backend, inst.device)
        tokenizers = TokenizerPool.for_model(model.path, effective_max_length(model, inst.max_length),
                                             cfg.tokenizer_pool, device, model.recipe)
        mode = str(cfg.model_pool.mode)
        labels = tokenizers.template.label_ids if tokenizers.template else None
        # picklable: process mode sends it
        factory = functools.partial(create_backend, inst, str(model.path), label_ids=labels)
        return cls(model, tokenizers, cfg.batching, factory,
                   {"backend": backend, "device": device, "precision": inst.quantization,
                    "recipe": model.recipe.name},
                   cfg.model_pool.workers or default_workers(device), cfg.model_pool.threads_per_worker, observe_batch,
                   default_mode(device) if mode == "auto" else mode)

    def start(self) -> "Pipeline":
        self.tokenizers.warmup()
        self.models.start(warmup=warmup_backend, calibrate=self._calibrate if self.batcher.cost else None)
        self.started = True
        return self

    def _calibrate(self, backend: Backend) -> None:
        """Fit the batch planner's cost model to this backend (cached per machine, model,
        backend, precision and threads): a few timed shapes, once."""
        from xbench.env import machine

        def forward(rows: int, length: int) -> None:
            # Rows differ from their first token on, so a decoder's shared prefix is not timed as free.
            width = min(length, self.max_length)
            ids = np.broadcast_to(1000 + np.arange(rows, dtype=np.int64)[:, None] % 1000, (rows, width)).copy()
            backend.forward(ids, np.ones_like(ids), np.zeros_like(ids))

        m = machine()
        weights = self.model.path / "model.safetensors"
        stat = weights.stat() if weights.is_file() else None
        key = {"cpu": m["cpu"], "cores": m["cores"], "gpu": m["gpu"], "torch": m["torch"],
               "onnxruntime": m["onnxruntime"], "model": str(self.model.path),
               "weights": [stat.st_size, stat.st_mtime_ns] if stat else None, **self._backend_params,
               "threads": self.models.threads, "packed": self.models.packed, "max_length": self.max_length,
               "cuda_graphs": getattr(backend, "graphed", None) is not None}
        # A backend that computes on padding may run a multiple of 16 tokens faster than one token
        # fewer (measured); never padded past max_length, which the position embeddings allow.
        probe = not self.models.packed and self.max_length % cost_model.ALIGNMENT == 0
        fitted = cost_model.load_or_calibrate(key, forward, cache_dir() / "costs", probe_alignment=probe)
        self.batcher.cost = dataclasses.replace(fitted, packed=self.models.packed,
                                                varlen_attention=bool(getattr(backend, "varlen_attention", False)))
        self.backlog.seed(self.batcher.cost)

    def _observed(self, batch: ModelBatch, seconds: float) -> None:
        self.backlog.observe_batch(batch.real_tokens, seconds)
        if self._observe_batch:
            self._observe_batch(batch, seconds)

    def _after_batch(self) -> None:
        if self.batcher.idle:  # a burst is over: give back what its large batches freed
            self.memory.maybe_release()
            self.models.release_memory()

    # -- requests -------------------------------------------------------------------------
    def submit(self, pairs: list[Pair], truncate: bool = True, direction: str = "right") -> RerankJob:
        """Tokenize, batch and score pairs; the job ends with logits in the pairs' order. Pairs
        longer than max_length are cut from the `direction` side or, with truncate=False, fail
        the job with InputTooLong once tokenized, before they reach the model."""
        job = RerankJob(pairs, truncate, direction)
        job.count_work(self.backlog)
        job.reservation = self.batcher.reserve()
        try:
            tokenizing = self.tokenizers.submit(pairs, direction)
        except BaseException as exc:  # e.g. the pool is shut down: the job fails, its reservation with it
            job.fail(exc)
            return job
        tokenizing.add_done_callback(lambda f: self._tokenized(job, f))
        return job

    def submit_encoded(self, encoded: Encoded) -> RerankJob:
        """Score pairs that are already tokenized (infer-bench: the model stage alone)."""
        job = RerankJob([], encoded=encoded)
        self._enqueue(job, dataclasses.replace(encoded, tokenize_s=0.0))
        return job

    def _tokenized(self, job: RerankJob, tokenizing: Future[Encoded]) -> None:
        exc = tokenizing.exception()
        if exc is None and not job.truncate and tokenizing.result().truncated:
            exc = InputTooLong(tokenizing.result().truncated, self.max_length)
        if exc is not None:
            job.fail(exc)
            return
        self._enqueue(job, tokenizing.result())

    def _enqueue(self, job: RerankJob, encoded: Encoded) -> None:
        job.queued(encoded)
        if job.gone or job.done:  # cancelled meanwhile, or nothing to score
            job.release_reservation()
            return
        self.batcher.put(job)

    # -- description and lifecycle -----------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            **self._backend_params,
            "max_length": self.max_length,
            "model_workers": self.models.workers,
            "model_mode": self.models.mode,
            "threads_per_worker": self.models.threads,
            "tokenizer_workers": self.tokenizers.workers,
            "tokenizer_mode": self.tokenizers.mode,
            "parallelism": self.tokenizers.parallelism,
            "engine": self.models.backend_info,
            "packed": self.models.packed,
            "planner": self.planner,
            "batch_cost_model": self.batcher.cost.describe() if self.batcher.cost else None,
        }

    def fault(self) -> str | None:
        """What keeps the pipeline from scoring (not started, a model worker stopped, the
        tokenizer processes broke), or None."""
        if not self.models.healthy():
            return "model pool: not started, or a model worker stopped"
        return self.tokenizers.fault()

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


__all__ = ["Pipeline", "RerankJob", "RerankResult", "sigmoid", "warmup_backend"]
