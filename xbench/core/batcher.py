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

No Python object stands for a pair: beside a GPU the batcher's Python work caps the pipeline, so
queued pairs are numpy columns (`_Pairs`), their tokens sit in a shared store (`_TokenStore`)
that a batch is gathered from in a few numpy steps, and scores go back one call per job. A batch
leaves flat (`ModelBatch`), and is padded only for a backend that takes padded batches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator

import numpy as np

from xbench.backends.base import Backend, takes_flat
from xbench.config import BatchingConfig
from xbench.core import cost_model
from xbench.core.cost_model import CostModel
from xbench.core.request import RerankJob
from xbench.core.tokenizer_pool import Encoded
from xbench.layout import pad, round_up, run_positions

PLAN_WINDOW_BATCHES = 8  # pairs planned at once: the oldest max_batch_size x this many
TOKEN_BLOCK = 1 << 20  # tokens a block of the batcher's token store holds (8 MiB of ids and types)


@dataclass
class ModelBatch:
    """A batch for a backend, flat (xbench/layout.py: the pairs' tokens back to back, as a packed
    backend takes them; `padded` lays it out for the others when first read), and whose pairs it
    holds: job k's pairs are rows bounds[k]:bounds[k + 1], and row r is pair index[r] of its job."""

    flat_ids: np.ndarray  # int32 [tokens]
    flat_types: np.ndarray  # int32 [tokens]
    lengths: np.ndarray  # int64 [rows]
    jobs: list[RerankJob] = field(default_factory=list)
    bounds: list[int] = field(default_factory=lambda: [0])
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    length_multiple: int = 1  # padded, the width is the longest pair rounded up to this (CostModel.width)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @cached_property
    def longest(self) -> int:
        return int(self.lengths.max())

    @property
    def width(self) -> int:
        """The padded layout's width."""
        return round_up(self.longest, self.length_multiple)

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.width

    @cached_property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @cached_property
    def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask, token_type_ids), right-padded: for backends that pad."""
        return pad(self.flat_ids, self.flat_types, self.lengths, self.width)

    def forward(self, backend: Backend) -> np.ndarray:
        """The backend's logits for this batch, in the layout it declared: flat, or padded (once:
        the padded batch is kept)."""
        if takes_flat(backend):
            return backend.forward_packed(self.flat_ids, self.flat_types, self.lengths)
        return backend.forward(*self.padded)

    def by_job(self) -> Iterator[tuple[RerankJob, slice]]:
        """Each job with the rows that hold its pairs."""
        return ((job, slice(a, b)) for job, a, b in zip(self.jobs, self.bounds, self.bounds[1:]))


def plan_batches(lengths: np.ndarray | list[int], max_batch_size: int, max_batch_tokens: int, bucketing: bool,
                 cost: CostModel | None = None) -> list[np.ndarray]:
    """Cut positions 0..n-1 into batches. With a cost model (and bucketing): the cuts of least
    estimated cost over the length-sorted order. Without: sorted by length when bucketing, else
    in order, a batch closing at max_batch_size rows or when its padded size would pass
    max_batch_tokens. A single over-budget row still runs alone."""
    if cost is not None and bucketing:
        return cost_model.plan(lengths, cost, max_batch_size, max_batch_tokens)
    as_array = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(as_array, kind="stable") if bucketing else np.arange(len(as_array))
    return cost_model.fill_greedily(order, as_array[order], max_batch_size, max_batch_tokens)


@dataclass
class _Pairs:
    """Queued pairs as columns, a row a pair: no Python object per pair, since the batcher works
    under the GIL that a GPU's model workers need, and re-plans a pair several times while it waits."""

    job: np.ndarray  # the job's key in Batcher._jobs
    index: np.ndarray  # the pair's position in its job
    length: np.ndarray
    seq: np.ndarray  # arrival order in the batcher
    block: np.ndarray  # where its tokens are in the token store: the block ...
    start: np.ndarray  # ... and the offset of its first token there

    def __len__(self) -> int:
        return len(self.job)

    def columns(self) -> tuple[np.ndarray, ...]:
        return self.job, self.index, self.length, self.seq, self.block, self.start

    def take(self, rows: np.ndarray | slice) -> "_Pairs":
        return _Pairs(*(c[rows] for c in self.columns()))

    @staticmethod
    def concat(parts: list["_Pairs"]) -> "_Pairs":
        return _Pairs(*map(np.concatenate, zip(*(p.columns() for p in parts))))


NO_PAIRS = _Pairs(*(np.zeros(0, dtype=np.int64) for _ in range(6)))


class _TokenStore:
    """The queued pairs' token ids and types, copied on arrival into large blocks, so a batch that
    mixes pairs of many requests is gathered from one or two blocks in a few numpy steps. A block
    goes once every pair stored in it has left the queue; the newest is refilled from its start."""

    def __init__(self, block_tokens: int = TOKEN_BLOCK):
        self._block_tokens = block_tokens
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # number -> (ids, types)
        self._queued: dict[int, int] = {}  # number -> its pairs still queued
        self._newest = -1
        self._top = 0  # tokens used in the newest block

    def store(self, enc: Encoded) -> tuple[int, int]:
        """Copy `enc`'s tokens in: (the block, the offset of its first token)."""
        n = enc.total_tokens
        if self._newest not in self._blocks or self._top + n > len(self._blocks[self._newest][0]):
            self._newest += 1
            size = max(self._block_tokens, n)
            self._blocks[self._newest] = (np.empty(size, dtype=np.int32), np.empty(size, dtype=np.int32))
            self._queued[self._newest] = 0
            self._top = 0
        ids, types = self._blocks[self._newest]
        at = self._top
        ids[at:at + n], types[at:at + n] = enc.flat_ids, enc.flat_types
        self._queued[self._newest] += len(enc)
        self._top += n
        return self._newest, at

    def arrays(self, blocks: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {b: self._blocks[b] for b in np.unique(blocks).tolist()}

    def release(self, blocks: np.ndarray) -> None:
        """Pairs stored in `blocks` (one entry a pair) left the queue."""
        numbers, counts = np.unique(blocks, return_counts=True)
        for b, n in zip(numbers.tolist(), counts.tolist()):
            self._queued[b] -= n
            if self._queued[b] == 0:
                if b == self._newest:
                    self._top = 0
                else:
                    del self._blocks[b], self._queued[b]

    @staticmethod
    def gather(pairs: _Pairs, arrays: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """The pairs' ids and types back to back, in their order."""
        at = run_positions(pairs.start, pairs.length)
        if len(arrays) == 1:
            ids, types = next(iter(arrays.values()))
            return ids[at], types[at]
        flat_ids, flat_types = np.empty(len(at), dtype=np.int32), np.empty(len(at), dtype=np.int32)
        token_block = np.repeat(pairs.block, pairs.length)
        for b, (ids, types) in arrays.items():
            here = token_block == b
            flat_ids[here], flat_types[here] = ids[at[here]], types[at[here]]
        return flat_ids, flat_types


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
        self._jobs: dict[int, list] = {}  # key -> [job, its pairs still queued]
        self._next_key = 0
        self._pending: deque[tuple[RerankJob, _Pairs]] = deque()  # arrived since the last plan, oldest first
        self._pending_pairs = 0
        self._window = NO_PAIRS  # the pairs of the last plan ...
        self._planned: list[np.ndarray] = []  # ... its batches not yet taken (rows of the window), oldest pair's first
        self._tokens = _TokenStore()
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
        enc = job.encoded
        assert enc is not None
        n = len(enc)
        with self._cond:
            was_empty = not self._pending
            if n:
                key, self._next_key = self._next_key, self._next_key + 1
                self._jobs[key] = [job, n]
                block, at = self._tokens.store(enc)
                first, self._arrivals = self._arrivals, self._arrivals + n
                self._pending.append((job, _Pairs(np.full(n, key), np.arange(n), enc.lengths,
                                                  np.arange(first, first + n), np.full(n, block), at + enc.starts)))
                self._pending_pairs += n
            job.release_reservation()  # wakes a worker itself if that was the last job on its way
            # Wake one worker only when its decision changes: an idle one starts timing the
            # oldest pair, or a full batch is there. A wake-up that finds nothing due costs a GIL
            # hand-over on the thread that delivers tokenized jobs, per job.
            if n and (was_empty or self._pending_pairs >= self.max_batch_size):
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
            return self._pending_pairs + sum(map(len, self._planned))

    # -- consumers -------------------------------------------------------------------
    def next_batch(self) -> ModelBatch | None:
        """Block until a batch is due; None once the batcher is closed and drained."""
        taken = self._take()
        if taken is None:
            return None
        pairs, jobs, bounds, arrays = taken
        # Gathered outside the lock, on the worker's thread; the store keeps these pairs' tokens
        # until they are released.
        flat_ids, flat_types = _TokenStore.gather(pairs, arrays)
        with self._cond:
            self._tokens.release(pairs.block)
        return ModelBatch(flat_ids, flat_types, pairs.length, jobs, bounds, pairs.index,
                          self.cost.length_multiple if self.cost else 1)

    def _take(self) -> tuple[_Pairs, list[RerankJob], list[int], dict] | None:
        """The next batch's pairs, their rows grouped by job, with their jobs and token blocks."""
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
                    pairs = self._window.take(self._planned.pop(0))
                    break
                if self._closed:
                    return None
                if not self._pending:
                    self._cond.wait()
            pairs = pairs.take(np.argsort(pairs.job, kind="stable"))
            keys, firsts, counts = np.unique(pairs.job, return_index=True, return_counts=True)
            jobs = []
            for key, n in zip(keys.tolist(), counts.tolist()):
                entry = self._jobs[key]
                jobs.append(entry[0])
                entry[1] -= n
                if entry[1] == 0:
                    del self._jobs[key]
            return pairs, jobs, [*firsts.tolist(), len(pairs)], self._tokens.arrays(pairs.block)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- internals (called with the lock held) -----------------------------------------
    def _waited(self) -> float:
        return self._clock() - self._pending[0][0].enqueued

    def _due_now(self) -> bool:
        """Cut the pending pairs now: a full batch is there, nothing more is on its way, the
        oldest has waited timeout_ms, batching is off, or the batcher is closing."""
        with self._cond:
            return bool(self._pending) and (
                self._pending_pairs >= self.max_batch_size
                or self._incoming == 0
                or self._waited() >= self.timeout_s
                or not self.enabled
                or self._closed
            )

    def _drop_gone(self) -> None:
        """Jobs whose caller went away (or that failed) cost no compute. The queues are scanned
        only when a queued job has gone since the last scan."""
        if self._gone_jobs == self._gone_dropped:
            return
        self._gone_dropped = self._gone_jobs
        gone = [key for key, (job, _) in self._jobs.items() if job.gone]
        if not gone:
            return
        for key in gone:
            del self._jobs[key]
        for _, pairs in (entry for entry in self._pending if entry[0].gone):
            self._pending_pairs -= len(pairs)
            self._tokens.release(pairs.block)
        self._pending = deque(entry for entry in self._pending if not entry[0].gone)
        if self._planned:
            kept = ~np.isin(self._window.job, gone)
            planned = np.concatenate(self._planned)
            self._tokens.release(self._window.block[planned[~kept[planned]]])
            self._planned = [rows[kept[rows]] for rows in self._planned if kept[rows].any()]

    def _still_planned(self) -> _Pairs:
        return self._window.take(np.concatenate(self._planned)) if self._planned else NO_PAIRS

    def _pop_pending(self, room: int) -> _Pairs:
        """Up to `room` of the oldest pending pairs, out of the pending queue."""
        parts = []
        while room > 0 and self._pending:
            job, pairs = self._pending[0]
            if len(pairs) > room:  # the rest of this job stays pending
                self._pending[0] = (job, pairs.take(slice(room, None)))
                pairs = pairs.take(slice(0, room))
            else:
                self._pending.popleft()
            parts.append(pairs)
            room -= len(pairs)
            self._pending_pairs -= len(pairs)
        return _Pairs.concat(parts) if parts else NO_PAIRS

    def _plan(self) -> None:
        """Re-plan the batches not yet taken together with the pairs that arrived since: the
        oldest pairs (a window of whole batches) are cut, the oldest pair's batch first."""
        kept = self._still_planned()
        if not self.enabled:  # no cross-request batching: one request at a time, in arrival order
            _, head = self._pending.popleft()
            self._pending_pairs -= len(head)
            ends = np.cumsum([len(rows) for rows in self._planned]).tolist()
            self._window = _Pairs.concat([kept, head])
            self._planned = [np.arange(a, b) for a, b in zip([0, *ends[:-1]], ends)]
            self._planned += [rows + len(kept) for rows in self._cut(head)]
            return
        room = max(0, self.max_batch_size * PLAN_WINDOW_BATCHES - len(kept))
        window = _Pairs.concat([kept, self._pop_pending(room)])
        if not self.bucketing:  # cut in arrival order; bucketing sorts by length anyway
            window = window.take(np.argsort(window.seq, kind="stable"))
        self._window, self._planned = window, self._cut(window)

    def _cut(self, pairs: _Pairs) -> list[np.ndarray]:
        """Cut pairs into batches (rows of `pairs`), the batch holding the oldest pair first."""
        cuts = plan_batches(pairs.length, self.max_batch_size, self.max_batch_tokens, self.bucketing, self.cost)
        cuts.sort(key=lambda rows: pairs.seq[rows].min())
        return cuts
