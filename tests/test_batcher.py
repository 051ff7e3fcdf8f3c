"""The batcher: order, bucketing, waiting rules (on an injected clock), reservations, hang-ups."""

import numpy as np

from xbench.config import BatchingConfig
from xbench.bench.batches import collate
from xbench.core.batcher import Batcher, ModelBatch, _TokenStore, plan_batches
from xbench.core.request import RerankJob
from xbench.core.tokenizer_pool import Encoded
from xbench.errors import RequestCancelled
from xbench.layout import unpad


class Clock:
    """A clock the test moves by hand: waiting rules are checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def encoded(lengths):
    ids = [np.arange(1, n + 1, dtype=np.int32) for n in lengths]
    return Encoded.from_pairs(ids, [np.zeros(n, dtype=np.int32) for n in lengths])


def job(lengths, clock=None):
    j = RerankJob([])
    j.queued(encoded(lengths))
    if clock is not None:
        j.enqueued = clock.now
    return j


def score_by_length(batch):
    """The "model" scores a pair by its length: any mix-up of order shows."""
    lengths = batch.padded[1].sum(axis=1).astype(np.float32)
    for j, rows in batch.by_job():
        j.deliver(batch.index[rows], lengths[rows], 0.0)


def cuts(batches):
    return [b.tolist() for b in batches]


def test_plan_batches_buckets_by_length():
    lengths = [50, 10, 40, 12, 45, 11]
    assert cuts(plan_batches(lengths, 3, 10**6, bucketing=True)) == [[1, 5, 3], [2, 4, 0]]
    assert cuts(plan_batches(lengths, 3, 10**6, bucketing=False)) == [[0, 1, 2], [3, 4, 5]]


def test_plan_batches_respects_the_padded_token_budget():
    # 4 rows of 30 = 120 padded tokens > 100: the 4th row starts a new batch
    assert cuts(plan_batches([30, 30, 30, 30], 8, 100, bucketing=True)) == [[0, 1, 2], [3]]
    # a single over-budget row still runs alone rather than never
    assert cuts(plan_batches([500], 8, 100, bucketing=True)) == [[0]]


def test_bucketing_cuts_padding():
    lengths = [10, 200] * 16

    def padded(bucketing):
        return sum(len(b) * max(lengths[i] for i in b) for b in plan_batches(lengths, 8, 10**6, bucketing))

    assert padded(True) < 0.6 * padded(False)


def test_collate_pads_right_with_mask():
    ids, mask, types = collate([np.array([5, 6, 7]), np.array([8])], [np.array([0, 1, 1]), np.array([0])])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert types.tolist() == [[0, 1, 1], [0, 0, 0]]


def test_a_batch_goes_flat_to_a_backend_that_takes_it_so_and_padded_to_others():
    batch = ModelBatch(np.array([5, 6, 7, 8], np.int32), np.array([0, 1, 1, 0], np.int32), np.array([3, 1]))

    class Padded:
        def forward(self, ids, mask, types):
            self.padded = (ids, mask, types)
            return np.zeros(len(ids), np.float32)

    class Flat(Padded):
        packed = flat_input = True

        def forward_packed(self, ids, types, lengths):
            self.flat = (ids, types, lengths)
            return np.ones(len(lengths), np.float32)

    class PaddedAfterAll(Flat):  # has forward_packed, but declares that it takes padded batches
        flat_input = False

    padded, flat, padded_after_all = Padded(), Flat(), PaddedAfterAll()
    assert batch.forward(padded_after_all).tolist() == [0, 0] and not hasattr(padded_after_all, "flat")
    assert batch.forward(padded).tolist() == [0, 0]
    assert [a.tolist() for a in padded.padded] == [[[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[0, 1, 1], [0, 0, 0]]]
    assert batch.forward(flat).tolist() == [1, 1] and not hasattr(flat, "padded")
    assert [a.tolist() for a in flat.flat] == [[5, 6, 7, 8], [0, 1, 1, 0], [3, 1]]
    assert (batch.rows, batch.longest, batch.real_tokens, batch.padded_tokens) == (2, 3, 4, 6)
    assert [a.tolist() for a in unpad(*batch.padded)] == [a.tolist() for a in flat.flat]  # and back


def test_batches_mix_requests_and_each_request_gets_its_own_order():
    b = Batcher(BatchingConfig(max_batch_size=4, timeout_ms=1000))
    jobs = [job([9, 3, 7]), job([2, 8, 5])]
    for j in jobs:
        b.put(j)
    seen = 0
    while seen < 6:
        batch = b.next_batch()
        assert batch.rows <= 4
        score_by_length(batch)
        seen += batch.rows
    assert jobs[0].result(0).logits.tolist() == [9, 3, 7]
    assert jobs[1].result(0).logits.tolist() == [2, 8, 5]


def test_lone_request_is_not_held_for_the_timeout():
    clock = Clock()
    b = Batcher(BatchingConfig(max_batch_size=32, timeout_ms=2000), clock=clock)
    b.put(job([5], clock))  # nothing else is being tokenized: due at once, whatever the clock says
    assert b.next_batch().rows == 1


def test_a_reservation_holds_the_batch_open_until_its_pairs_arrive():
    clock = Clock()
    b = Batcher(BatchingConfig(max_batch_size=4, timeout_ms=3000), clock=clock)
    first, second = job([5, 5], clock), job([6, 6], clock)
    second.reservation = b.reserve()  # still being tokenized
    b.put(first)
    assert not b._due_now()  # 2 of 4 rows, more on their way, the timeout not reached
    b.put(second)  # arrives: uses up its reservation
    batch = b.next_batch()
    assert batch.rows == 4 and set(batch.jobs) == {first, second}


def test_the_timeout_bounds_the_wait_for_a_reservation_that_never_arrives():
    clock = Clock()
    b = Batcher(BatchingConfig(max_batch_size=32, timeout_ms=100), clock=clock)
    stuck = RerankJob([])
    stuck.reservation = b.reserve()
    b.put(job([5], clock))
    assert not b._due_now()
    clock.now += 0.1  # the oldest pair has waited timeout_ms
    assert b._due_now()
    assert b.next_batch().rows == 1


def test_a_job_that_fails_before_the_batcher_releases_its_reservation():
    b = Batcher(BatchingConfig(max_batch_size=32, timeout_ms=10_000))
    failed = RerankJob([])
    failed.reservation = b.reserve()
    failed.fail(ValueError("tokenizer broke"))
    failed.fail(ValueError("twice"))  # settled once: the reservation is not released twice
    assert b._incoming == 0
    b.put(job([5]))
    assert b.next_batch().rows == 1  # not held for the 10 s timeout


def test_disabled_batching_never_mixes_requests():
    b = Batcher(BatchingConfig(enabled=False, max_batch_size=8))
    j1, j2 = job([3, 4]), job([5])
    b.put(j1)
    b.put(j2)
    assert b.next_batch().jobs == [j1]
    assert b.next_batch().jobs == [j2]


def test_cancelled_jobs_are_dropped_before_compute():
    b = Batcher(BatchingConfig(max_batch_size=8))
    gone, kept = job([3, 3]), job([4])
    b.put(gone)
    b.put(kept)
    gone.cancel()
    batch = b.next_batch()
    assert batch.jobs == [kept] and batch.rows == 1
    assert sum(b._tokens._queued.values()) == 0  # the cancelled pairs' tokens were let go too
    try:
        gone.result(0)
    except RequestCancelled:
        pass
    else:
        raise AssertionError("a cancelled job has no result")


def test_close_drains_then_ends():
    b = Batcher(BatchingConfig())
    b.put(job([3]))
    b.close()
    assert b.next_batch() is not None
    assert b.next_batch() is None


def test_a_batch_mixing_many_requests_holds_each_pairs_own_tokens():
    """Rows are gathered from the batcher's token store, in blocks that requests share (here so
    small that batches span several): every row holds its own pair's ids, mask and types, every
    score reaches its pair, and the store lets go of every block once its pairs are taken."""
    b = Batcher(BatchingConfig(max_batch_size=8, timeout_ms=1000))
    b._tokens = _TokenStore(block_tokens=16)
    rng = np.random.default_rng(0)
    jobs = []
    for j in range(12):
        lengths = rng.integers(1, 12, size=int(rng.integers(1, 6))).tolist()
        pair_ids = [100 * j + i + 1 for i in range(len(lengths))]  # never 0, the padding id
        queued = RerankJob([])
        queued.queued(Encoded.from_pairs([np.full(n, p, dtype=np.int32) for p, n in zip(pair_ids, lengths)],
                                         [np.ones(n, dtype=np.int32) for n in lengths]))
        b.put(queued)
        jobs.append((queued, pair_ids, lengths))
    length_of = {p: n for _, ids, lengths in jobs for p, n in zip(ids, lengths)}
    spanned = 0
    while not all(j.done for j, _, _ in jobs):
        batch = b.next_batch()
        input_ids, mask, types = batch.padded
        first = input_ids[:, 0]
        lengths = mask.sum(axis=1)
        assert lengths.tolist() == [length_of[p] for p in first.tolist()]
        assert ((input_ids == first[:, None]) == mask.astype(bool)).all()
        assert (types == mask).all()
        spanned = max(spanned, len({p // 100 for p in first.tolist()}))
        for j, rows in batch.by_job():
            j.deliver(batch.index[rows], first[rows].astype(np.float32), 0.0)
    for j, pair_ids, _ in jobs:
        assert j.result(0).logits.tolist() == pair_ids
    assert spanned > 2  # batches did mix requests from several blocks
    assert list(b._tokens._queued.values()) == [0] and b._tokens._top == 0
