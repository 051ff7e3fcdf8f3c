"""ModelPool: M worker threads, each owning one backend instance, pulling batches.

Threads, not processes: every backend releases the GIL inside its forward pass, and threads
share the batches without copying them. Each worker sets its own intra-op thread count, by
default the cores split evenly, so M workers on C cores do not oversubscribe them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from xbench.backends import Backend, create_backend
from xbench.core.batcher import ModelBatch

log = logging.getLogger(__name__)

BatchSource = Callable[[], "ModelBatch | None"]
BatchObserver = Callable[[ModelBatch, float], None]


def threads_per_worker(workers: int, configured: int | None) -> int:
    if configured:
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


class ModelPool:
    def __init__(self, instance: Any, model_dir: str, workers: int, threads: int | None,
                 source: BatchSource, observe: BatchObserver | None = None):
        self.instance = instance
        self.workers = workers
        self.threads = threads_per_worker(workers, threads)
        self._model_dir = model_dir
        self._source = source
        self._observe = observe
        self._threads: list[threading.Thread] = []
        self._ready = threading.Barrier(workers + 1)
        self._load_errors: list[BaseException] = []
        self.backend_info: dict[str, Any] = {}
        self.alive = False

    def start(self, warmup: Callable[[Backend], None] | None = None) -> None:
        """Load one backend per worker (on the worker's thread) and wait until all are warm."""
        for i in range(self.workers):
            t = threading.Thread(target=self._run, args=(warmup,), name=f"xbench-model-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._ready.wait()
        if self._load_errors:
            raise self._load_errors[0]
        self.alive = True

    def _run(self, warmup: Callable[[Backend], None] | None) -> None:
        try:
            backend = create_backend(self.instance, self._model_dir, self.threads)
            if warmup:
                warmup(backend)
            self.backend_info = backend.describe()
        except BaseException as exc:  # reported by start() on the caller's thread
            self._load_errors.append(exc)
            self._ready.wait()
            return
        self._ready.wait()
        while (batch := self._source()) is not None:
            self._process(backend, batch)

    def _process(self, backend: Backend, batch: ModelBatch) -> None:
        start = time.perf_counter()
        try:
            logits = backend.forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        except Exception as exc:  # a bad batch fails its requests, never the worker
            log.exception("forward failed on a batch of %d rows", batch.rows)
            for m in batch.members:
                m.request.fail(exc)
            return
        elapsed = time.perf_counter() - start
        if self._observe:
            self._observe(batch, elapsed)
        # Group rows by request so each request takes its lock once per batch.
        by_request: dict[int, tuple[Any, list[int], list[int]]] = {}
        for row, m in enumerate(batch.members):
            entry = by_request.setdefault(id(m.request), (m.request, [], []))
            entry[1].append(m.index)
            entry[2].append(row)
        for request, indices, rows in by_request.values():
            request.deliver(indices, logits[rows], start)

    def healthy(self) -> bool:
        """Loaded, and every worker thread still running."""
        return self.alive and all(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for t in self._threads:
            t.join()
        self.alive = False
