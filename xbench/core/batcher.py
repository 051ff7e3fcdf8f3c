"""Dynamic batching of pairs across requests.

One queue of tokenized pairs; model workers pull batches from it. Pending pairs are cut into
batches over their length-sorted order (length bucketing) so short pairs are not padded to a
long one. With `planner: cost` (the default) the cuts minimise the estimated cost of the batches
under the backend's calibrated cost model (core/cost_model.py): a long-tailed mix is split into
length groups, a uniform one into full batches, and a lone request is cut the same way when
nothing else is queued. `planner: tokens` is the plain greedy cut by `max_batch_size` rows and a
`max_batch_tokens` budget of padded tokens. A request may be split across batches; its pairs
are rejoined in order.

A worker that asks for a batch gets one at once when a full batch is pending, when no more pairs
are on their way (nothing is being tokenized), or when the oldest pending pair has waited
`timeout_ms`; otherwise it waits for the batch to fill. So an idle model never holds a lone
request back, and a busy one gets full batches. Planned batches run oldest pair first; pairs
that arrive meanwhile are planned together with the batches not yet taken.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Callable

import numpy as np

from xbench.config import BatchingConfig
from xbench.core import cost_model
from xbench.core.cost_model import CostModel
from xbench.core.request import RerankJob
from xbench.core.tokenizer_pool import Encoded

PLAN_WINDOW_BATCHES = 8  # pairs planned at once: the oldest max_batch_size x this many


@dataclass(eq=False, slots=True)
class QueuedPair:
    job: RerankJob
    index: int
    length: int
    seq: int = 0  # arrival order in the batcher
    ids: np.ndarray | None = None  # the pair's token ids and token types, for collate
    type_ids: np.ndarray | None = None


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


def plan_batches(lengths: list[int], max_batch_size: int, max_batch_tokens: int, bucketing: bool,
                 cost: CostModel | None = None) -> list[list[int]]:
    """Cut positions 0..n-1 into batches. With a cost model (and bucketing): the cuts of least
    estimated cost over the length-sorted order. Without: sorted by length when bucketing, else
    in order, a batch closing at max_batch_size rows or when its padded size would pass
    max_batch_tokens. A single over-budget row still runs alone."""
    if cost is not None and bucketing:
        return cost_model.plan(lengths, cost, max_batch_size, max_batch_tokens)
    as_array = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(as_array, kind="stable") if bucketing else np.arange(len(lengths))
    return cost_model.fill_greedily(order, as_array[order], max_batch_size, max_batch_tokens)


def padded_batches(enc: Encoded, max_batch_size: int, max_batch_tokens: int = 10**9, bucketing: bool = True,
                   cost: CostModel | None = None) -> list[tuple[list[int], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Pre-tokenized pairs cut and padded as the batcher would: (positions, (ids, mask, types)) per
    batch. For measuring a backend alone, or scoring a fixed set of pairs, outside the pipeline."""
    return [(idx, collate([enc.ids[i] for i in idx], [enc.type_ids[i] for i in idx]))
            for idx in plan_batches(enc.lengths, max_batch_size, max_batch_tokens, bucketing, cost)]


def collate(ids: list[np.ndarray], type_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad token ids to the longest row: (input_ids, attention_mask, token_type_ids).
    Filled through the mask in one step, no Python loop over rows (a GPU takes thousands of
    pairs a second, and this runs under the GIL)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    real = np.arange(int(lengths.max())) < lengths[:, None]  # row-major: each row's tokens in order
    input_ids = np.zeros(real.shape, dtype=np.int64)
    types = np.zeros(real.shape, dtype=np.int64)
    input_ids[real] = np.concatenate(ids)
    types[real] = np.concatenate(type_ids)
    return input_ids, real.astype(np.int64), types


class _Reservation:
    """A job's claim that its pairs are on their way; released once, whichever way it ends."""

    def __init__(self, batcher: "Batcher"):
        self._batcher = batcher
        self._open = True

    def release(self) -> None:
        with self._batcher._cond:
            if self._open:
                self._open = False
                self._batcher._incoming -= 1
                if self._batcher._incoming == 0 and self._batcher._pending:  # nothing left to wait for
                    self._batcher._cond.notify()


class Batcher:
    def __init__(self, cfg: BatchingConfig, clock: Callable[[], float] = time.perf_counter):
        self.max_batch_size = int(cfg.max_batch_size)
        self.max_batch_tokens = int(cfg.max_batch_tokens)
        self.timeout_s = float(cfg.timeout_ms) / 1000.0
        self.enabled = bool(cfg.enabled)
        self.bucketing = bool(cfg.length_bucketing)
        # The planner's cost model: a prior until the pipeline calibrates the running backend.
        self.cost: CostModel | None = cost_model.PRIOR if cfg.planner == "cost" else None
        self._clock = clock
        self._pending: deque[QueuedPair] = deque()  # arrived since the last plan, oldest first
        self._planned: list[list[QueuedPair]] = []  # cut, not yet taken; oldest pair's batch first
        self._incoming = 0  # reservations: jobs being tokenized, whose pairs will arrive soon
        self._arrivals = 0
        self._gone_jobs = 0  # queued jobs that went away (cancelled, failed) ...
        self._gone_dropped = 0  # ... and how many of them the queues were last cleared of
        self._closed = False
        self._cond = threading.Condition()  # re-entrant: a reservation may be released under it

    # -- producers -------------------------------------------------------------------
    def reserve(self) -> _Reservation:
        """Announce a job's pairs before they are tokenized, so a worker may wait for them."""
        with self._cond:
            self._incoming += 1
        return _Reservation(self)

    def put(self, job: RerankJob) -> None:
        """Queue a tokenized job's pairs; its reservation, if any, is used up."""
        assert job.encoded is not None
        with self._cond:
            was_empty = not self._pending
            first = self._arrivals
            self._arrivals += len(job.encoded.ids)
            enc = job.encoded
            self._pending.extend(map(QueuedPair, repeat(job, len(enc.ids)), range(len(enc.ids)), enc.lengths,
                                     range(first, self._arrivals), enc.ids, enc.type_ids))
            job.release_reservation()  # wakes a worker itself if that was the last job on its way
            # Wake one worker only when its decision changes: an idle one starts timing the
            # oldest pair, or a full batch is there. A wake-up that finds nothing due costs a GIL
            # hand-over on the thread that delivers tokenized jobs, per job.
            if was_empty or len(self._pending) >= self.max_batch_size:
                self._cond.notify()
        job.add_done_callback(self._job_ended)

    def _job_ended(self, job: RerankJob) -> None:
        if job.gone:
            with self._cond:
                self._gone_jobs += 1

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing on its way."""
        with self._cond:
            return not self._pending and not self._planned and self._incoming == 0

    @property
    def queue_size(self) -> int:
        with self._cond:
            return len(self._pending) + sum(len(b) for b in self._planned)

    # -- consumers -------------------------------------------------------------------
    def next_batch(self) -> ModelBatch | None:
        """Block until a batch is due; None once the batcher is closed and drained."""
        members = self._next_members()
        if members is None:
            return None
        # Padding happens outside the lock, on the worker's thread.
        input_ids, mask, types = collate(list(map(_IDS, members)), list(map(_TYPE_IDS, members)))
        return ModelBatch(input_ids, mask, types, members)

    def _next_members(self) -> list[QueuedPair] | None:
        with self._cond:
            while True:
                self._drop_gone()
                if self._pending:
                    if self._due_now():
                        self._plan()
                    elif not self._planned:
                        self._cond.wait(self.timeout_s - self._waited())
                        continue
                if self._planned:
                    if len(self._planned) > 1:  # more batches are cut: pass them to another worker
                        self._cond.notify()
                    return self._planned.pop(0)
                if self._closed:
                    return None
                if not self._pending:
                    self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- internals (called with the lock held) -----------------------------------------
    def _waited(self) -> float:
        return self._clock() - self._pending[0].job.enqueued

    def _due_now(self) -> bool:
        """Cut the pending pairs now: a full batch is there, nothing more is on its way, the
        oldest has waited timeout_ms, batching is off, or the batcher is closing."""
        with self._cond:
            return bool(self._pending) and (
                len(self._pending) >= self.max_batch_size
                or self._incoming == 0
                or self._waited() >= self.timeout_s
                or not self.enabled
                or self._closed
            )

    def _drop_gone(self) -> None:
        """Jobs whose caller went away (or that failed) cost no compute. The queues are scanned
        only when a queued job has gone since the last scan: a scan costs Python work per pair."""
        if self._gone_jobs == self._gone_dropped:
            return
        self._gone_dropped = self._gone_jobs
        if any(p.job.gone for p in self._pending):
            self._pending = deque(p for p in self._pending if not p.job.gone)
        if any(p.job.gone for b in self._planned for p in b):
            self._planned = [kept for b in self._planned if (kept := [p for p in b if not p.job.gone])]

    def _plan(self) -> None:
        """Re-plan the batches not yet taken together with the pairs that arrived since: the
        oldest pairs (a window of whole batches) are cut, the oldest pair's batch first."""
        if not self.enabled:  # no cross-request batching: one request at a time, in arrival order
            head = self._pending[0].job
            take = next((i for i, p in enumerate(self._pending) if p.job is not head), len(self._pending))
            self._planned += self._cut([self._pending.popleft() for _ in range(take)])
            return
        window = [p for b in self._planned for p in b]
        room = max(0, self.max_batch_size * PLAN_WINDOW_BATCHES - len(window))
        window += [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        if not self.bucketing:  # cut in arrival order; bucketing sorts by length anyway
            window.sort(key=_SEQ)
        self._planned = self._cut(window)

    def _cut(self, window: list[QueuedPair]) -> list[list[QueuedPair]]:
        """Cut pairs into batches, the batch holding the oldest pair first."""
        cuts = plan_batches(list(map(_LENGTH, window)), self.max_batch_size, self.max_batch_tokens,
                            self.bucketing, self.cost)
        arrival = np.fromiter(map(_SEQ, window), dtype=np.int64, count=len(window))
        cuts.sort(key=lambda idx: arrival[idx].min())
        return [list(map(window.__getitem__, idx)) for idx in cuts]


_SEQ, _LENGTH, _IDS, _TYPE_IDS = attrgetter("seq"), attrgetter("length"), attrgetter("ids"), attrgetter("type_ids")
