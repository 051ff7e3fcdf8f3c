"""BackendProcess: one backend in a spawned process of its own, called like the backend itself.

Beside a CUDA model the eager forward is bound by the host launching its operators, and each
launch holds the GIL, which the tokenizer results, the batcher, the model pool and the server
need too: in one process they slow each other down (on an H200 the pipeline reached 0.69x the
raw forward where the pre-tokenized infer-bench passed it). Here the backend runs in a process
that does nothing else, as the raw forward does, and the model pool's workers hand it their
batches down a pipe and wait for the scores with the GIL free. The process runs the batches in
the order they arrive, so while it runs one the next is already waiting in its queue.

If the process dies (killed, or a crash in native code), the batches it held fail (one of them
may be what killed it) and the pool starts a new process that loads the same backend
(core/processes.py); the batches after go to it.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import numpy as np

from xbench.backends.base import takes_flat
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
            "flat_input": takes_flat(_backend),
            "describe": _backend.describe()}


# -- in the parent ----------------------------------------------------------------------------
class BackendProcess:
    def __init__(self, factory: BackendFactory, threads: int, name: str = "xbench-model"):
        self._checking = threading.Lock()
        self._checked = 0  # replacements whose load is known to have worked
        self._load_fault: str | None = None  # set when a replacement could not load the backend
        self._pool = WorkerProcesses(1, _load, (factory, threads), name=name)
        try:
            self._traits = self._pool.submit(_traits).result()  # raises the backend's load error
        except BaseException:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise
        self.packed = self._traits["packed"]
        self.varlen_attention = self._traits["varlen_attention"]
        self.graphed = True if self._traits["graphed"] else None
        self.flat_input = self._traits["flat_input"]  # the layout of the backend it runs
        if self.flat_input:
            self.forward_packed = functools.partial(self._run, "forward_packed")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        return self._run("forward", input_ids, attention_mask, token_type_ids)

    def _run(self, method: str, *args: Any) -> Any:
        if self.fault:
            raise RuntimeError(self.fault)
        if self._pool.restarts != self._checked:
            self._check_replacement()
        return self._pool.submit(_call, method, *args).result()

    def _check_replacement(self) -> None:
        """The process died and the pool started another (processes.py), whose load is not yet
        known: a load that fails there (the GPU's memory still held, say) is a fault that /health
        reports, not an error every batch would meet."""
        with self._checking:
            restarts = self._pool.restarts
            if restarts == self._checked:
                return
            try:
                self._pool.submit(_traits).result()
            except BrokenProcessPool:  # it died too: the pool replaces it again, or gives up (broken)
                raise
            except BaseException as exc:
                self._load_fault = f"its replacement could not load the backend ({type(exc).__name__}: {exc})"
                log.error("model process: %s", self._load_fault)
                raise RuntimeError(self.fault) from exc
            log.warning("model process died and was replaced (%d so far)", restarts)
            self._checked = restarts

    def release_memory(self) -> None:
        """Ask the process to give back what a burst's large batches freed (core/memory.py), as
        the pipeline does for itself once the batcher is idle; no waiting for it."""
        try:
            self._pool.submit(_release_memory)
        except (BrokenProcessPool, RuntimeError):  # broken or closed: nothing to release
            pass

    @property
    def pid(self) -> int:
        return self._pool.pids[0]

    @property
    def fault(self) -> str | None:
        """Why no batch can be scored (a replacement that could not load, or a process that keeps
        dying), or None."""
        reason = self._load_fault or self._pool.broken
        return f"model process: {reason}" if reason else None

    @property
    def restarts(self) -> int:
        return self._pool.restarts

    def describe(self) -> dict[str, Any]:
        return {**self._traits["describe"], "process": "own", "process_restarts": self.restarts}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
