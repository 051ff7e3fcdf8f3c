"""Dynamic batching of pairs across requests.

One queue of tokenized pairs; model workers pull batches from it. A batch is cut by
`max_batch_size` rows and a `max_batch_tokens` budget of *padded* tokens (rows x longest
row), after sorting the pending pairs by length (length bucketing) so short pairs are not
padded to a long one. A worker that asks for a batch gets one at once when a full batch is
pending, when no more pairs are on their way (nothing is being tokenized), or when the oldest
pending pair has waited `timeout_ms`; otherwise it waits for the batch to fill. So an idle
model never holds a lone request back, and a busy one gets full batches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from xbench.config import BatchingConfig
from xbench.core.tokenizer_pool import Encoded


class RequestCancelled(Exception):
    """The client went away; its pairs were dropped before they cost compute."""


@dataclass
class RerankResult:
    """Scores of one request in its own order, and where its time went."""

    logits: np.ndarray
    total_tokens: int
    stages_s: dict[str, float]
    truncated: int = 0


@dataclass(eq=False)
class PendingRequest:
    """A request whose pairs are in the batcher; completed by whichever workers score them."""

    encoded: Encoded
    submitted: float
    tokenize_started: float
    enqueued: float = 0.0
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    _remaining: int = 0
    _first_infer: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        n = len(self.encoded.ids)
        self.logits = np.empty(n, dtype=np.float32)
        self._remaining = n

    def cancel(self) -> None:
        self.cancelled = True
        if not self.future.done():
            self.future.set_exception(RequestCancelled())

    def deliver(self, indices: list[int], logits: np.ndarray, infer_start: float) -> None:
        with self._lock:
            self.logits[indices] = logits
            self._remaining -= len(indices)
            if self._first_infer is None or infer_start < self._first_infer:
                self._first_infer = infer_start
            done = self._remaining == 0
        if done and not self.future.done():
            now = time.perf_counter()
            first = self._first_infer or now
            tokenize = self.encoded.tokenize_s
            stages = {
                # waiting for a tokenizer worker + waiting in the batcher
                "queue": max(0.0, (self.tokenize_started - self.submitted) + (first - self.enqueued)),
                "tokenize": tokenize,
                "infer": now - first,
            }
            self.future.set_result(RerankResult(self.logits, self.encoded.total_tokens, stages, self.encoded.truncated))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(eq=False)
class QueuedPair:
    request: PendingRequest
    index: int
    length: int


@dataclass
class ModelBatch:
    """A padded batch ready for a backend, and whose pairs it holds."""

    input_ids: np.ndarray  # int64 [rows, seq]
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    members: list[QueuedPair] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def plan_batches(lengths: list[int], max_batch_size: int, max_batch_tokens: int, bucketing: bool) -> list[list[int]]:
    """Cut positions 0..n-1 into batches: sorted by length when bucketing, else in order;
    a batch closes at max_batch_size rows or when its padded size would pass max_batch_tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if bucketing else list(range(len(lengths)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and (len(current) >= max_batch_size or max(longest, n) * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def padded_batches(enc: Encoded, max_batch_size: int, max_batch_tokens: int = 10**9,
                   bucketing: bool = True) -> list[tuple[list[int], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Pre-tokenized pairs cut and padded as the batcher would: (positions, (ids, mask, types)) per
    batch. For measuring a backend alone, or scoring a fixed set of pairs, outside the pipeline."""
    return [(idx, collate([enc.ids[i] for i in idx], [enc.type_ids[i] for i in idx]))
            for idx in plan_batches(enc.lengths, max_batch_size, max_batch_tokens, bucketing)]


def collate(ids: list[np.ndarray], type_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad token ids to the longest row: (input_ids, attention_mask, token_type_ids)."""
    rows, width = len(ids), max(len(x) for x in ids)
    input_ids = np.zeros((rows, width), dtype=np.int64)
    types = np.zeros((rows, width), dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for r, (a, t) in enumerate(zip(ids, type_ids)):
        input_ids[r, : len(a)] = a
        types[r, : len(t)] = t
        mask[r, : len(a)] = 1
    return input_ids, mask, types


class Batcher:
    def __init__(self, cfg: BatchingConfig):
        self.max_batch_size = int(cfg.max_batch_size)
        self.max_batch_tokens = int(cfg.max_batch_tokens)
        self.timeout_s = float(cfg.timeout_ms) / 1000.0
        self.enabled = bool(cfg.enabled)
        self.bucketing = bool(cfg.length_bucketing)
        self._pending: deque[QueuedPair] = deque()
        self._ready: deque[list[QueuedPair]] = deque()
        self._incoming = 0  # requests being tokenized: pairs that will arrive soon
        self._closed = False
        self._cond = threading.Condition()

    # -- producers -------------------------------------------------------------------
    def expect(self) -> None:
        with self._cond:
            self._incoming += 1

    def put(self, request: PendingRequest, expected: bool = True) -> None:
        request.enqueued = time.perf_counter()
        pairs = [QueuedPair(request, i, n) for i, n in enumerate(request.encoded.lengths)]
        with self._cond:
            if expected:
                self._incoming -= 1
            self._pending.extend(pairs)
            self._cond.notify_all()

    def arrived_empty(self) -> None:
        """A request that was expected will not come (its tokenization failed)."""
        with self._cond:
            self._incoming -= 1
            self._cond.notify_all()

    @property
    def queue_size(self) -> int:
        with self._cond:
            return len(self._pending) + sum(len(b) for b in self._ready)

    # -- consumers -------------------------------------------------------------------
    def next_batch(self) -> ModelBatch | None:
        """Block until a batch is due; None once the batcher is closed and drained."""
        members = self._next_members()
        if members is None:
            return None
        # Padding happens outside the lock, on the worker's thread.
        input_ids, mask, types = collate(
            [m.request.encoded.ids[m.index] for m in members],
            [m.request.encoded.type_ids[m.index] for m in members],
        )
        return ModelBatch(input_ids, mask, types, members)

    def _next_members(self) -> list[QueuedPair] | None:
        with self._cond:
            while True:
                if self._ready:
                    return self._ready.popleft()
                self._drop_cancelled()
                if self._pending:
                    waited = time.perf_counter() - self._pending[0].request.enqueued
                    due = (
                        len(self._pending) >= self.max_batch_size
                        or self._incoming == 0
                        or waited >= self.timeout_s
                        or not self.enabled
                        or self._closed
                    )
                    if due:
                        self._cut()
                        continue
                    self._cond.wait(self.timeout_s - waited)
                elif self._closed:
                    return None
                else:
                    self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- internals (called with the lock held) -----------------------------------------
    def _drop_cancelled(self) -> None:
        if any(p.request.cancelled for p in self._pending):
            self._pending = deque(p for p in self._pending if not p.request.cancelled)

    def _cut(self) -> None:
        """Move the oldest pending pairs into ready batches."""
        if self.enabled:
            # A window of whole batches (up to 4) from the head of the queue, so bucketing
            # can sort across requests while the oldest pairs still go first.
            full = len(self._pending) // self.max_batch_size
            take = self.max_batch_size * min(full, 4) if full else len(self._pending)
        else:  # no cross-request batching: one request at a time
            head = self._pending[0].request
            take = next((i for i, p in enumerate(self._pending) if p.request is not head), len(self._pending))
        window = [self._pending.popleft() for _ in range(take)]
        for idx in plan_batches([p.length for p in window], self.max_batch_size, self.max_batch_tokens, self.bucketing):
            self._ready.append([window[i] for i in idx])
