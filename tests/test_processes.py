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


def test_a_dead_worker_fails_the_jobs_it_held_and_a_new_process_takes_its_place(pool):
    first = pool.pids
    slow = pool.submit(time.sleep, 0.5)  # goes to one worker; the poison to the other
    doomed = pool.submit(os._exit, 3)
    with pytest.raises(BrokenProcessPool, match="exit code 3"):
        doomed.result(timeout=60)
    assert slow.result(timeout=60) is None  # the other worker's job was not touched
    assert pool.restarts == 1 and pool.broken is None
    assert len(set(pool.pids) - set(first)) == 1  # one new process, in the dead one's place
    assert sorted(f.result(timeout=60) for f in [pool.submit(pow, i, 2) for i in range(20)]) == sorted(
        i * i for i in range(20))
    assert set(f.result(timeout=60) for f in [pool.submit(os.getpid) for _ in range(40)]) <= set(pool.pids)


def exit_at_start() -> None:
    os._exit(4)


def test_a_worker_that_keeps_dying_breaks_the_pool_instead_of_respawning_forever():
    pool = WorkerProcesses(1, initializer=exit_at_start)
    try:
        doomed = pool.submit(pow, 2, 2)
        with pytest.raises(BrokenProcessPool, match="exit code 4"):
            doomed.result(timeout=60)
        deadline = time.monotonic() + 60
        while pool.broken is None and time.monotonic() < deadline:  # its replacements die too
            time.sleep(0.05)
        assert "three times without finishing a job" in pool.broken
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
