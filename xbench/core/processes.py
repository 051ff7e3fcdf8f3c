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
every result back and completes its future there. A worker that dies (killed, or a crash in
native code) fails only the jobs it held, and a new process takes its place.
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
        self._ctx = mp.get_context("spawn")  # forking a process that already ran rayon threads can deadlock
        self._initializer, self._initargs, self._name = initializer, initargs, name
        self._requests: list[Connection] = [None] * workers  # type: ignore[list-item]
        self._processes: list[Any] = [None] * workers
        self._sending = [threading.Lock() for _ in range(workers)]
        results = [self._start(i) for i in range(workers)]
        self._lock = threading.Lock()
        self._futures: dict[int, tuple[Future, int]] = {}  # key -> (its future, its worker)
        self._outstanding = [0] * workers
        self._deaths_without_progress = [0] * workers  # deaths since the worker last finished a job
        self.restarts = 0
        self._keys = itertools.count()
        self._closed = False
        self._broken: str | None = None
        self._receiver = threading.Thread(target=self._receive, args=(results,), name=f"{name}-results",
                                          daemon=True)
        self._receiver.start()

    def _start(self, worker: int) -> Connection:
        """Spawn worker `worker` (its initializer runs first); returns the end its results arrive on."""
        requests_out, requests_in = self._ctx.Pipe(duplex=False)
        results_out, results_in = self._ctx.Pipe(duplex=False)
        _widen(requests_in)
        _widen(results_in)
        process = self._ctx.Process(target=_serve, args=(requests_out, results_in, self._initializer, self._initargs),
                                    name=f"{self._name}-{worker}", daemon=True)
        process.start()
        requests_out.close()  # the child's ends: EOF then reaches whichever side is left
        results_in.close()
        self._requests[worker] = requests_in
        self._processes[worker] = process
        return results_out

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
                    worker = live.pop(conn)
                    conn.close()
                    if (replacement := self._lost(worker)) is not None:
                        live[replacement] = worker
                    continue
                self._deaths_without_progress[live[conn]] = 0
                self._settle(key, result, error)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    @property
    def broken(self) -> str | None:
        """Why the pool takes no more jobs (a worker that keeps dying), or None while it serves."""
        return self._broken

    def _lost(self, worker: int) -> Connection | None:
        """A worker's results pipe closed: expected after shutdown, a death before it. The jobs
        it held fail (one may be what killed it) and a new process takes its place; the other
        workers' jobs go on. A worker that dies three times without finishing a job in between
        (a crash in its initializer, say) breaks the pool, as ProcessPoolExecutor's breaks at the
        first death: every job still out fails, and so does every later submit, rather than the
        pool respawning forever. Returns the replacement's results end, or None."""
        process = self._processes[worker]
        process.join(timeout=5)  # reaped, so its exit code says how it died
        reason = f"worker process {worker} died unexpectedly (exit code {process.exitcode})"
        with self._lock:
            if self._closed:
                return None
            self._deaths_without_progress[worker] += 1
            if self._deaths_without_progress[worker] >= 3:
                self._broken = f"{reason}, three times without finishing a job"
            pending = [key for key, (_, w) in self._futures.items() if self._broken or w == worker]
        for key in pending:
            self._settle(key, None, BrokenProcessPool(self._broken or reason))
        if self._broken:
            return None
        with self._sending[worker]:  # no job goes down the dead pipe while it is swapped
            if self._closed:  # shut down meanwhile: nothing to replace it for
                return None
            self._requests[worker].close()
            replacement = self._start(worker)
        self.restarts += 1
        return replacement

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
