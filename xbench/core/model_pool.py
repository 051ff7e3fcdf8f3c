"""ModelPool: M worker threads pulling batches, each running them on a backend.

Thread mode: each worker owns a backend instance in this process. Every backend releases the
GIL inside its forward pass, and threads share the batches without copying them. Each worker
sets its own intra-op thread count, by default the cores split evenly, so M workers on C cores
do not oversubscribe them.

Process mode (the default beside a CUDA model): the workers share one backend that runs in a
spawned process of its own (core/backend_process.py), so the host work of launching a GPU's kernels
and the rest of the pipeline's Python do not take turns on one GIL. The process runs the
workers' batches back to back; M is then how many batches are handed over at once.

The pool counts the tokens it computes: real tokens, padded tokens (rows x padded width) and the
tokens the dense layers actually ran on (the real ones for a packed backend), so every result
can state its padding efficiency.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from xbench.backends import Backend
from xbench.core.batcher import ModelBatch
from xbench.env import usable_cores
from xbench.errors import NonFiniteScores

log = logging.getLogger(__name__)

BatchSource = Callable[[], "ModelBatch | None"]
BatchObserver = Callable[[ModelBatch, float], None]
BackendFactory = Callable[[int], Backend]  # intra-op threads -> a loaded backend


@dataclass
class TokenCounts:
    """Tokens through the model so far. efficiency = real / computed: 1.0 means no compute
    went to padding."""

    batches: int = 0
    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # rows x padded width: what attention runs on
    computed_tokens: int = 0  # what the dense layers ran on: padded, or real when packed

    def add(self, rows: int, real: int, padded: int, computed: int) -> None:
        self.batches += 1
        self.rows += rows
        self.real_tokens += real
        self.padded_tokens += padded
        self.computed_tokens += computed

    def since(self, before: "TokenCounts") -> dict[str, Any]:
        """The counts accumulated after `before`, with the efficiency they give."""
        d = {k: v - getattr(before, k) for k, v in asdict(self).items()}
        d["efficiency"] = d["real_tokens"] / d["computed_tokens"] if d["computed_tokens"] else None
        return d


def default_workers(device: str) -> int:
    """Model workers when the config leaves them open: two share a CUDA device, so one worker's
    host work (collating, handing scores back, launching) overlaps the other's GPU time; one on
    the CPU, where a worker's intra-op threads already use every core."""
    return 2 if str(device).startswith("cuda") else 1


def default_mode(device: str) -> str:
    """`model_pool.mode=auto`: the backend in a process of its own beside a CUDA model, whose
    launches need the GIL; threads on the CPU, where the backend releases it while it computes."""
    return "process" if str(device).startswith("cuda") else "thread"


def threads_per_worker(workers: int, configured: int | None) -> int:
    if configured:
        return int(configured)
    return max(1, usable_cores() // workers)


class ModelPool:
    def __init__(self, backend: BackendFactory, workers: int, threads: int | None,
                 source: BatchSource, observe: BatchObserver | None = None,
                 after_batch: Callable[[], None] | None = None, mode: str = "thread"):
        self.workers = workers
        self.mode = mode
        self.threads = threads_per_worker(1 if mode == "process" else workers, threads)
        self._create_backend = backend
        self._source = source
        self._observe = observe
        self._after_batch = after_batch  # on the worker, once the batch's scores are delivered
        self._threads: list[threading.Thread] = []
        # Backends load and warm up one at a time: the libraries they import on first use
        # (transformers' lazy modules) are not safe to import from two threads at once; the CUDA
        # graphs a worker captures while warming up never overlap another worker's weight copies;
        # and weights loaded together would double the peak memory for no gain.
        self._loading = threading.Lock()
        self._warm = threading.Barrier(workers)
        self._ready = threading.Barrier(workers + 1)
        self._load_errors: list[BaseException] = []
        self._backend_info: dict[str, Any] = {}
        self.packed = False
        self.tokens = TokenCounts()
        self._tokens_lock = threading.Lock()
        self.backend_process: Any = None  # the shared BackendProcess, in process mode
        self.alive = False

    def start(self, warmup: Callable[[Backend], None] | None = None,
              calibrate: Callable[[Backend], None] | None = None) -> None:
        """Load one backend per worker (on the worker's thread), wait until all are warm, then
        let worker 0 `calibrate` its backend while the others are idle. In process mode the one
        backend loads first, in its process (its load error is raised here), and every worker
        takes it."""
        if self.mode == "process":
            from xbench.core.backend_process import BackendProcess

            self.backend_process = BackendProcess(self._create_backend, self.threads)
        for i in range(self.workers):
            t = threading.Thread(target=self._run, args=(i, warmup, calibrate), name=f"xbench-model-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._ready.wait()
        if self._load_errors:
            raise self._load_errors[0]
        self.alive = True

    def _run(self, index: int, warmup: Callable[[Backend], None] | None,
             calibrate: Callable[[Backend], None] | None) -> None:
        backend = None
        try:
            with self._loading:
                backend = self.backend_process or self._create_backend(self.threads)
                if warmup and (index == 0 or self.backend_process is None):  # a shared backend warms up once
                    warmup(backend)
        except BaseException as exc:  # reported by start() on the caller's thread
            self._load_errors.append(exc)
        self._warm.wait()
        try:
            if backend is not None and index == 0 and not self._load_errors:
                self.packed = bool(getattr(backend, "packed", False))
                if calibrate:
                    calibrate(backend)
                self._backend_info = backend.describe()
        except BaseException as exc:
            self._load_errors.append(exc)
        self._ready.wait()
        if backend is None or self._load_errors:
            return
        try:
            while (batch := self._source()) is not None:
                self._process(backend, batch)
                if self._after_batch:
                    self._after_batch()
        finally:
            if hasattr(backend, "close") and backend is not self.backend_process:  # engines with threads of their own
                backend.close()

    def _process(self, backend: Backend, batch: ModelBatch) -> None:
        start = time.perf_counter()
        try:
            logits = batch.forward(backend)
            if not np.isfinite(logits).all():  # a NaN must fail loudly, never rank documents
                raise NonFiniteScores(int((~np.isfinite(logits)).sum()), batch.rows,
                                      str(self._backend_info.get("engine", type(backend).__name__)))
        except Exception as exc:  # a bad batch fails its jobs, never the worker
            log.exception("forward failed on a batch of %d rows", batch.rows)
            for job, _ in batch.by_job():
                job.fail(exc)
            return
        elapsed = time.perf_counter() - start
        real = batch.real_tokens
        with self._tokens_lock:
            self.tokens.add(batch.rows, real, batch.padded_tokens, real if self.packed else batch.padded_tokens)
        if self._observe:
            self._observe(batch, elapsed)
        for job, rows in batch.by_job():  # a job's rows lie together: one call a job, not a pair
            job.deliver(batch.index[rows], logits[rows], start)

    @property
    def backend_info(self) -> dict[str, Any]:
        """What the backend says of itself (a model process: as of now, with its restarts)."""
        return self.backend_process.describe() if self.backend_process is not None else self._backend_info

    def release_memory(self) -> None:
        """The model process's share of giving freed memory back (this process's is the pipeline's)."""
        if self.backend_process is not None:
            self.backend_process.release_memory()

    def token_counts(self) -> TokenCounts:
        """A snapshot of the token counters (subtract two with `since`)."""
        with self._tokens_lock:
            return TokenCounts(**asdict(self.tokens))

    def healthy(self) -> bool:
        """Loaded, every worker thread still running, and the model process (if any) able to
        score: one that died is replaced, one that could not be is a fault."""
        return (self.alive and all(t.is_alive() for t in self._threads)
                and (self.backend_process is None or self.backend_process.fault is None))

    def join(self) -> None:
        for t in self._threads:
            t.join()
        if self.backend_process is not None:
            self.backend_process.close()
        self.alive = False
