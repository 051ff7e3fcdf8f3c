"""WorkerProcesses: an Executor of N spawned processes that never wait on their parent.

The tokenizer pool runs its workers as processes beside a CUDA model (a model worker needs the
GIL to launch kernels). concurrent.futures' ProcessPoolExecutor did that before, and under load
its processes waited on the parent: it hands them at most workers + 1 jobs at a time through a
feeder thread and takes results back through a manager thread, both needing the parent's GIL,
which the model workers and the event loop hold most of the time; and a result bigger than a
pipe's 64 KiB (a 128-pair request's ids and types are ~70 KiB) kept its process blocked in the
write until the manager thread got the GIL to read it.

Here every job goes straight down its worker's pipe from the submitting thread (to the worker
with the fewest outstanding), each worker reads its pipe as soon as anything arrives into a queue
of its own, pipes are widened to 1 MiB where Linux allows it, and one thread of the parent takes
every result back and completes its future there.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import pickle
import queue
import signal
import threading
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size


def _widen(conn: Connection) -> None:
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):  # not Linux, or a lower pipe-max-size: 64 KiB it is
        pass


def _sendable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling both ways, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(requests: Connection, results: Connection, initializer: Callable[..., None] | None,
           initargs: tuple) -> None:
    """A worker process: run each job in arrival order and send back (key, result, error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes the pipes
    if initializer is not None:
        initializer(*initargs)
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:  # take jobs off the pipe as they come: the parent's writes never wait on a job
        while True:
            try:
                inbox.put(requests.recv())
            except (EOFError, OSError):  # the parent shut the pool down (or is gone)
                inbox.put(None)
                return

    threading.Thread(target=read, daemon=True).start()
    while (job := inbox.get()) is not None:
        key, fn, args, kwargs = job
        try:
            reply = (key, fn(*args, **kwargs), None)
        except BaseException as exc:
            reply = (key, None, _sendable(exc))
        try:  # plain pickle: for a 70 KiB result, an eighth of ForkingPickler's time (Connection.send's)
            results.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:  # a result that does not pickle
            results.send_bytes(pickle.dumps((key, None, _sendable(exc)), protocol=pickle.HIGHEST_PROTOCOL))


class WorkerProcesses(Executor):
    def __init__(self, workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 name: str = "xbench-worker"):
        ctx = mp.get_context("spawn")  # forking a process that already ran rayon threads can deadlock
        self._requests: list[Connection] = []
        self._sending = [threading.Lock() for _ in range(workers)]
        self._processes: list[Any] = []
        results: list[Connection] = []
        for i in range(workers):
            requests_out, requests_in = ctx.Pipe(duplex=False)
            results_out, results_in = ctx.Pipe(duplex=False)
            _widen(requests_in)
            _widen(results_in)
            process = ctx.Process(target=_serve, args=(requests_out, results_in, initializer, initargs),
                                  name=f"{name}-{i}", daemon=True)
            process.start()
            requests_out.close()  # the child's ends: EOF then reaches whichever side is left
            results_in.close()
            self._requests.append(requests_in)
            results.append(results_out)
            self._processes.append(process)
        self._lock = threading.Lock()
        self._futures: dict[int, tuple[Future, int]] = {}  # key -> (its future, its worker)
        self._outstanding = [0] * workers
        self._keys = itertools.count()
        self._closed = False
        self._broken: str | None = None
        self._receiver = threading.Thread(target=self._receive, args=(results,), name=f"{name}-results",
                                          daemon=True)
        self._receiver.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        key = next(self._keys)
        # Pickled on the caller's thread, so a bad argument fails here; plain pickle, a third
        # cheaper than ForkingPickler (a job holds no pipes or sockets to reduce).
        job = pickle.dumps((key, fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        future: Future = Future()
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(self._broken)
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            worker = min(range(len(self._outstanding)), key=self._outstanding.__getitem__)
            self._futures[key] = (future, worker)
            self._outstanding[worker] += 1
        try:
            with self._sending[worker]:
                self._requests[worker].send_bytes(job)
        except OSError as exc:  # the worker died, or the pool shut down meanwhile
            self._settle(key, None, BrokenProcessPool(f"worker process {worker} is gone ({exc})"))
        return future

    def _settle(self, key: int, result: Any, error: BaseException | None) -> None:
        with self._lock:
            entry = self._futures.pop(key, None)
            if entry is None:
                return
            future, worker = entry
            self._outstanding[worker] -= 1
        if not future.set_running_or_notify_cancel():  # cancelled by shutdown(cancel_futures=True)
            return
        if error is None:
            future.set_result(result)  # its callbacks run here (the tokenizer pool's: queue the pairs)
        else:
            future.set_exception(error)

    def _receive(self, results: list[Connection]) -> None:
        live = {conn: worker for worker, conn in enumerate(results)}
        while live:
            for conn in wait(list(live)):
                try:
                    key, result, error = conn.recv()
                except (EOFError, OSError):
                    self._lost(live.pop(conn))
                    continue
                self._settle(key, result, error)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    @property
    def broken(self) -> str | None:
        """Why the pool takes no more jobs after a worker died, or None while it is whole."""
        return self._broken

    def _lost(self, worker: int) -> None:
        """A worker's results pipe closed: expected after shutdown, a crash before it. A crash
        breaks the pool (as ProcessPoolExecutor's does): every job still out fails, and so does
        every later submit, rather than waiting forever."""
        process = self._processes[worker]
        process.join(timeout=5)  # reaped, so its exit code says how it died
        with self._lock:
            if self._closed:
                return
            self._broken = f"a worker process died unexpectedly (exit code {process.exitcode})"
            pending = list(self._futures)
        for key in pending:
            self._settle(key, None, BrokenProcessPool(self._broken))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the job pipes: each worker finishes what it was sent, then exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            outstanding = [future for future, _ in self._futures.values()]
        if cancel_futures:
            for future in outstanding:
                future.cancel()
        for lock, conn in zip(self._sending, self._requests):
            with lock:
                conn.close()
        if wait:
            for process in self._processes:
                process.join()
            self._receiver.join()
