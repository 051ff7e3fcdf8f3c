import threading
import time

import numpy as np

from xbench.config import BatchingConfig
from xbench.core.batcher import Batcher, PendingRequest, collate, plan_batches
from xbench.core.tokenizer_pool import Encoded


def encoded(lengths):
    ids = [np.arange(1, n + 1, dtype=np.int32) for n in lengths]
    return Encoded(ids, [np.zeros(n, dtype=np.int32) for n in lengths])


def request(lengths):
    now = time.perf_counter()
    return PendingRequest(encoded(lengths), submitted=now, tokenize_started=now)


def test_plan_batches_buckets_by_length():
    lengths = [50, 10, 40, 12, 45, 11]
    assert plan_batches(lengths, 3, 10**6, bucketing=True) == [[1, 5, 3], [2, 4, 0]]
    assert plan_batches(lengths, 3, 10**6, bucketing=False) == [[0, 1, 2], [3, 4, 5]]


def test_plan_batches_respects_the_padded_token_budget():
    # 4 rows of 30 = 120 padded tokens > 100: the 4th row starts a new batch
    assert plan_batches([30, 30, 30, 30], 8, 100, bucketing=True) == [[0, 1, 2], [3]]
    # a single over-budget row still runs alone rather than never
    assert plan_batches([500], 8, 100, bucketing=True) == [[0]]


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


def test_batches_mix_requests_and_each_request_gets_its_own_order():
    b = Batcher(BatchingConfig(max_batch_size=4, timeout_ms=1000))
    reqs = [request([9, 3, 7]), request([2, 8, 5])]
    for r in reqs:
        b.put(r, expected=False)
    seen = 0
    while seen < 6:
        batch = b.next_batch()
        assert batch.rows <= 4
        # the "model" scores a pair by its length: any mix-up of order shows
        batch_start = time.perf_counter()
        for m in batch.members:
            m.request.deliver([m.index], np.array([m.length], dtype=np.float32), batch_start)
        seen += batch.rows
    assert reqs[0].future.result().logits.tolist() == [9, 3, 7]
    assert reqs[1].future.result().logits.tolist() == [2, 8, 5]


def test_lone_request_is_not_held_for_the_timeout():
    b = Batcher(BatchingConfig(max_batch_size=32, timeout_ms=2000))
    b.put(request([5]), expected=False)  # nothing else is being tokenized
    t0 = time.perf_counter()
    assert b.next_batch().rows == 1
    assert time.perf_counter() - t0 < 0.1


def test_waits_for_more_pairs_while_some_are_on_their_way():
    b = Batcher(BatchingConfig(max_batch_size=4, timeout_ms=3000))
    b.expect()
    b.expect()
    b.put(request([5, 5]))  # one more request is still being tokenized
    threading.Timer(0.2, lambda: b.put(request([6, 6]))).start()
    t0 = time.perf_counter()
    batch = b.next_batch()
    waited = time.perf_counter() - t0
    assert batch.rows == 4  # both requests in one batch
    assert 0.15 < waited < 2.0


def test_timeout_bounds_the_wait():
    b = Batcher(BatchingConfig(max_batch_size=32, timeout_ms=100))
    b.expect()
    b.expect()
    b.put(request([5]))  # the other expected request never comes
    t0 = time.perf_counter()
    assert b.next_batch().rows == 1
    assert 0.08 < time.perf_counter() - t0 < 1.0


def test_disabled_batching_never_mixes_requests():
    b = Batcher(BatchingConfig(enabled=False, max_batch_size=8))
    r1, r2 = request([3, 4]), request([5])
    b.put(r1, expected=False)
    b.put(r2, expected=False)
    assert {m.request for m in b.next_batch().members} == {r1}
    assert {m.request for m in b.next_batch().members} == {r2}


def test_cancelled_requests_are_dropped_before_compute():
    b = Batcher(BatchingConfig(max_batch_size=8))
    gone, kept = request([3, 3]), request([4])
    b.put(gone, expected=False)
    b.put(kept, expected=False)
    gone.cancel()
    batch = b.next_batch()
    assert [m.request for m in batch.members] == [kept]


def test_close_drains_then_ends():
    b = Batcher(BatchingConfig())
    b.put(request([3]), expected=False)
    b.close()
    assert b.next_batch() is not None
    assert b.next_batch() is None
