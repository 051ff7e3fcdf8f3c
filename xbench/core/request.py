"""One in-flight rerank request: the object every stage hands on and every caller waits on.

`Pipeline.submit` returns a `RerankJob`. It carries its pairs, their encoded form once
tokenized, its stage timestamps, and in the end its scores or its error. The tokenizer pool
fills in `encoded`, the batcher queues its pairs (and skips them once the job is gone), model
workers `deliver` scores row by row, and the caller waits on it: `result()` on a thread,
`await wait()` on an event loop, where cancelling the awaiting task cancels the job (TEI's queue
drops an entry whose reply channel is closed in the same way).

A job also counts its work in its pipeline's backlog (core/backlog.py), which admission reads:
its tokens are added when it is submitted (estimated, then counted once tokenized) and taken away
as its rows are scored, or all at once when it ends otherwise.

A job also holds its batcher reservation: while it is being tokenized the batcher knows more
pairs are coming and may wait for them to fill a batch; whichever way the job leaves that stage
(queued, failed, cancelled, empty), it releases the reservation itself, exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from xbench.core.backlog import Backlog
from xbench.core.tokenizer_pool import Encoded, Pair
from xbench.errors import RequestCancelled


@dataclass
class RerankResult:
    """Scores of one request in its own order, and where its time went."""

    logits: np.ndarray
    total_tokens: int
    stages_s: dict[str, float]
    truncated: int = 0


class Reservation(Protocol):
    def release(self) -> None: ...


class RerankJob:
    def __init__(self, pairs: list[Pair], truncate: bool = True, direction: str = "right",
                 encoded: Encoded | None = None):
        self.pairs = pairs
        self.truncate = truncate
        self.direction = direction
        self.encoded = encoded
        self.submitted = time.perf_counter()
        self.tokenize_started = self.submitted  # when a tokenizer worker picked it up
        self.enqueued = self.submitted  # when its pairs reached the batcher
        self.reservation: Reservation | None = None
        self.backlog: Backlog | None = None
        self._chars = 0  # characters of its pairs: the backlog's estimate before tokenizing
        self._owed = 0.0  # tokens this job has in the backlog
        self.cancelled = False
        self._logits: np.ndarray | None = None
        self._remaining = 0
        self._first_infer: float | None = None
        self._result: RerankResult | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[RerankJob], None]] = []
        self._done = threading.Event()
        self._lock = threading.Lock()

    # -- state ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def gone(self) -> bool:
        """No one will use its scores: cancelled, or already failed."""
        return self.cancelled or self._error is not None

    # -- the stages ------------------------------------------------------------------------
    def count_work(self, backlog: Backlog) -> None:
        """Add its estimated tokens to the backlog (made exact once tokenized)."""
        self.backlog = backlog
        self._chars = sum(map(len, itertools.chain.from_iterable(self.pairs)))
        self._owe(backlog.estimate(self._chars))

    def queued(self, encoded: Encoded) -> None:
        """Its pairs are tokenized and about to enter the batcher."""
        now = time.perf_counter()
        if self.backlog is not None:
            self.backlog.tokenized(self._chars, encoded.total_tokens)
            with self._lock:
                if not self._done.is_set():
                    self._owe(encoded.total_tokens - self._owed)
        self.encoded = encoded
        self.tokenize_started = now - encoded.tokenize_s
        self.enqueued = now
        n = len(encoded)
        self._logits = np.empty(n, dtype=np.float32)
        self._remaining = n
        if n == 0:  # nothing to score
            self._finish()

    def deliver(self, indices: np.ndarray | list[int], logits: np.ndarray, infer_start: float) -> None:
        """Scores of some of its pairs, from one model batch."""
        with self._lock:
            if self._done.is_set():
                return
            assert self._logits is not None
            self._logits[indices] = logits
            self._remaining -= len(indices)
            if self.backlog is not None:
                self._owe(-int(self.encoded.lengths[indices].sum()))  # type: ignore[union-attr]
            if self._first_infer is None or infer_start < self._first_infer:
                self._first_infer = infer_start
            finished = self._remaining == 0
        if finished:
            self._finish()

    def fail(self, exc: BaseException) -> None:
        self._settle(None, exc)

    def cancel(self) -> None:
        """The caller went away: its pairs are dropped before they cost compute."""
        self.cancelled = True
        self._settle(None, RequestCancelled())

    def release_reservation(self) -> None:
        if self.reservation is not None:
            self.reservation.release()

    # -- waiting ---------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> RerankResult:
        """Block until scored; raise its error if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no result within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    async def wait(self) -> RerankResult:
        """Await the scores; cancelling the awaiting task cancels the job."""
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[None] = loop.create_future()

        def wake(_: RerankJob) -> None:
            loop.call_soon_threadsafe(lambda: settled.done() or settled.set_result(None))

        self.add_done_callback(wake)
        try:
            await settled
        except asyncio.CancelledError:
            self.cancel()
            raise
        return self.result(0)

    def add_done_callback(self, fn: Callable[[RerankJob], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # -- internals -------------------------------------------------------------------------
    def _finish(self) -> None:
        now = time.perf_counter()
        first = self._first_infer or now
        enc = self.encoded
        assert enc is not None and self._logits is not None
        stages = {
            # waiting for a tokenizer worker + waiting in the batcher
            "queue": max(0.0, (self.tokenize_started - self.submitted) + (first - self.enqueued)),
            "tokenize": enc.tokenize_s,
            "infer": now - first,
        }
        self._settle(RerankResult(self._logits, enc.total_tokens, stages, enc.truncated), None)

    def _owe(self, tokens: float) -> None:
        if self.backlog is not None and tokens:
            self._owed += tokens
            self.backlog.add(tokens)

    def _settle(self, result: RerankResult | None, error: BaseException | None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._result, self._error = result, error
            self._owe(-self._owed)
            callbacks, self._callbacks = self._callbacks, []
            self._done.set()
        self.release_reservation()  # a job that never reached the batcher must not be awaited there
        for fn in callbacks:
            fn(self)
