"""WorkerProcesses: the tokenizer pool's processes, on real spawned processes."""

import os
import threading
import time
from concurrent.futures import wait
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from xbench.core.processes import WorkerProcesses


@pytest.fixture
def pool():
    workers = WorkerProcesses(2)
    yield workers
    workers.shutdown()


def test_every_job_comes_back_to_its_own_future_and_both_workers_take_jobs(pool):
    squares = [pool.submit(pow, i, 2) for i in range(200)]
    assert [f.result(timeout=60) for f in squares] == [i * i for i in range(200)]
    slow = [pool.submit(time.sleep, 0.2) for _ in range(2)]  # the least loaded worker gets the next job
    pids = [pool.submit(os.getpid) for _ in range(2)]
    wait(slow)
    assert len({f.result(timeout=60) for f in pids}) == 2


def test_a_result_larger_than_a_pipe_arrives_whole(pool):
    got = pool.submit(np.arange, 2_000_000, dtype=np.int32).result(timeout=60)  # 8 MB
    assert got.shape == (2_000_000,) and int(got[-1]) == 1_999_999


def test_errors_reach_their_future_and_the_workers_keep_serving(pool):
    with pytest.raises(ValueError):
        pool.submit(int, "not a number").result(timeout=60)
    with pytest.raises(TypeError, match="pickle"):  # a result that cannot cross processes
        pool.submit(threading.Lock).result(timeout=60)
    with pytest.raises(TypeError):  # an argument that cannot: refused on the caller's thread
        pool.submit(len, threading.Lock())
    assert pool.submit(pow, 3, 3).result(timeout=60) == 27


def test_a_dead_worker_breaks_the_pool_instead_of_hanging():
    pool = WorkerProcesses(1)
    try:
        doomed = pool.submit(os._exit, 3)
        with pytest.raises(BrokenProcessPool, match="exit code 3"):
            doomed.result(timeout=60)
        with pytest.raises(BrokenProcessPool):
            pool.submit(pow, 2, 2)
    finally:
        pool.shutdown()


def test_shutdown_finishes_what_was_sent_then_refuses_more():
    pool = WorkerProcesses(1)
    sent = pool.submit(time.sleep, 0.3)
    pool.shutdown(wait=True)
    assert sent.done() and sent.exception() is None
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(pow, 2, 2)
