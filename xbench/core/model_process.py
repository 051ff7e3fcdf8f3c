"""BackendProcess: one backend in a spawned process of its own, called like the backend itself.

Beside a CUDA model the eager forward is bound by the host launching its operators, and each
launch holds the GIL, which the tokenizer results, the batcher, the model pool and the server
need too: in one process they slow each other down (on an H200 the pipeline reached 0.69x the
raw forward where the pre-tokenized infer-bench passed it). Here the backend runs in a process
that does nothing else, as the raw forward does, and the model pool's workers hand it their
batches down a pipe and wait for the scores with the GIL free. The process runs the batches in
the order they arrive, so while it runs one the next is already waiting in its queue.

If the process dies (killed, or a crash in native code), the batches it held fail (one of them
may be what killed it), a fresh process loads the same backend, and batches not yet sent go to it.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import numpy as np

from xbench.core.memory import MemoryReleaser
from xbench.core.processes import WorkerProcesses

log = logging.getLogger(__name__)

BackendFactory = Callable[[int], Any]  # intra-op threads -> a loaded backend; picklable

# -- in the model process -------------------------------------------------------------------
_backend: Any = None
_load_error: BaseException | None = None
_memory: MemoryReleaser | None = None


def _load(factory: BackendFactory, threads: int) -> None:
    """The process's initializer: a load error is kept and raised by every call, so the parent
    sees the real exception rather than a process that exited."""
    global _backend, _load_error, _memory
    try:
        _backend = factory(threads)
    except BaseException as exc:
        _load_error = exc
    _memory = MemoryReleaser()  # its floor: the loaded model


def _release_memory() -> bool:
    return _memory is not None and _memory.maybe_release()


def _call(method: str, *args: Any) -> Any:
    if _load_error is not None:
        raise _load_error
    return getattr(_backend, method)(*args)


def _traits() -> dict[str, Any]:
    if _load_error is not None:
        raise _load_error
    return {"packed": bool(getattr(_backend, "packed", False)),
            "varlen_attention": bool(getattr(_backend, "varlen_attention", False)),
            "graphed": getattr(_backend, "graphed", None) is not None,
            "forward_packed": hasattr(_backend, "forward_packed"),
            "describe": _backend.describe()}


# -- in the parent ----------------------------------------------------------------------------
class BackendProcess:
    def __init__(self, factory: BackendFactory, threads: int, name: str = "xbench-model"):
        self._factory = factory
        self._threads = threads
        self._name = name
        self._restarting = threading.Lock()
        self.restarts = 0
        self.fault: str | None = None  # set when a restart could not load the backend
        self._pool = self._spawn()  # raises the backend's load error
        if self._traits["forward_packed"]:  # a packed backend without it gets padded batches
            self.forward_packed = functools.partial(self._run, "forward_packed")

    def _spawn(self) -> WorkerProcesses:
        pool = WorkerProcesses(1, _load, (self._factory, self._threads), name=self._name)
        try:
            self._traits = pool.submit(_traits).result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        self.packed = self._traits["packed"]
        self.varlen_attention = self._traits["varlen_attention"]
        self.graphed = True if self._traits["graphed"] else None
        return pool

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        return self._run("forward", input_ids, attention_mask, token_type_ids)

    def _run(self, method: str, *args: Any, retry: bool = True) -> Any:
        if self.fault:
            raise RuntimeError(self.fault)
        pool = self._pool
        try:
            future = pool.submit(_call, method, *args)
        except BrokenProcessPool:  # it died before this batch was sent: the batch goes to its successor
            self._restart(pool)
            if retry:
                return self._run(method, *args, retry=False)
            raise
        try:
            return future.result()
        except BrokenProcessPool:  # it died holding this batch, which may be what killed it: no retry
            self._restart(pool)
            raise

    def _restart(self, dead: WorkerProcesses) -> None:
        """Replace a pool whose process died, once, however many callers saw it die."""
        with self._restarting:
            if self._pool is not dead or self.fault:
                return
            dead.shutdown(wait=False)
            log.warning("model process died (%s); starting a new one", dead.broken)
            try:
                self._pool = self._spawn()
                self.restarts += 1
            except BaseException as exc:
                self.fault = f"model process: could not restart the backend ({type(exc).__name__}: {exc})"
                log.error(self.fault)

    def release_memory(self) -> None:
        """Ask the process to give back what a burst's large batches freed (core/memory.py), as
        the pipeline does for itself once the batcher is idle; no waiting for it."""
        try:
            self._pool.submit(_release_memory)
        except (BrokenProcessPool, RuntimeError):  # dead (the next batch restarts it) or closed
            pass

    @property
    def pid(self) -> int:
        return self._pool.pids[0]

    def describe(self) -> dict[str, Any]:
        return {**self._traits["describe"], "process": "own", "process_restarts": self.restarts}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
