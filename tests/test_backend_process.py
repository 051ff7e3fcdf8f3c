"""model_pool.mode=process: the backend in a process of its own (the default beside a CUDA model).

The process runs the real backend on the tiny model here; the CUDA case differs only in which
device the backend was built for."""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import httpx
import numpy as np
import pytest

from xbench.config import compose_config
from xbench.core.model_pool import ModelPool, default_mode
from xbench.core.backend_process import _release_memory
from xbench.core.pipeline import Pipeline
from serving import start_server
from xbench.workload import synthetic


class SlowBackend:
    """Scores zeros a second after a batch arrives: long enough to kill its process mid-batch."""

    packed = False

    def __init__(self, threads: int):
        pass

    def forward(self, input_ids, attention_mask, token_type_ids):
        if input_ids[0, 0] != 1000:  # not a warm-up batch (those are all token 1000)
            time.sleep(1.0)
        return np.zeros(len(input_ids), dtype=np.float32)

    def describe(self) -> dict:
        return {"engine": "slow"}


def wait_until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


def test_auto_mode_is_a_process_beside_cuda_only():
    assert default_mode("cuda") == default_mode("cuda:1") == "process"
    assert default_mode("cpu") == default_mode("mps") == "thread"


def test_the_backend_runs_in_a_process_of_its_own_and_scores_as_in_this_one(tiny_overrides):
    requests = [synthetic(256, seed=3, lengths="longtail").request(i, 5 + 3 * i).pairs for i in range(5)]
    logits = {}
    for mode in ("thread", "process"):
        cfg = compose_config(tiny_overrides + [f"model_pool.mode={mode}", "model_pool.workers=2"])
        with Pipeline.from_config(cfg) as pipe:
            logits[mode] = [j.result(timeout=60).logits for j in [pipe.submit(r) for r in requests]]
            described = pipe.describe()
            assert described["model_mode"] == mode
            if mode == "process":
                pid = pipe.models.backend_process.pid
                assert pid != os.getpid() and described["engine"]["process"] == "own"
                assert described["engine"]["packed"] is True  # what the backend in the process said of itself
                assert pipe.models.packed and pipe.batcher.cost is not None  # calibrated through the process
                # The process gives memory back by itself when asked (the pipeline asks when idle).
                assert isinstance(pipe.models.backend_process._pool.submit(_release_memory).result(), bool)
        if mode == "process":
            wait_until(lambda: not Path(f"/proc/{pid}").exists())  # closing the pipeline ends it
    for a, b in zip(logits["thread"], logits["process"]):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_a_backend_that_cannot_load_raises_its_own_error_from_its_process(tmp_path, tiny_model):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    errors = {}
    for mode in ("thread", "process"):
        pipe = Pipeline.from_config(compose_config([f"model_pool.instances.0.name={broken}", f"model_pool.mode={mode}"]))
        with pytest.raises(Exception) as caught:
            pipe.start()
        pipe.close()
        errors[mode] = caught.value
    assert type(errors["process"]) is type(errors["thread"])
    assert str(errors["process"]) == str(errors["thread"])


def test_a_killed_model_process_fails_the_batch_it_held_and_a_new_one_takes_the_next(tiny_overrides):
    pipe = Pipeline.from_config(compose_config(tiny_overrides + ["batching.planner=tokens"]))
    pipe.models = ModelPool(SlowBackend, 1, 1, pipe.batcher.next_batch, mode="process")  # the class is picklable
    with pipe:
        process = pipe.models.backend_process
        first = process.pid
        held = pipe.submit([("q", "a document")])
        time.sleep(0.3)  # the batch is in the process, which sleeps on it
        os.kill(first, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            held.result(timeout=30)
        # A new process loads the backend; the next request is scored there, and the pool is whole.
        assert len(pipe.submit([("q", "another document")]).result(timeout=60).logits) == 1
        assert process.pid != first and process.restarts == 1
        assert pipe.fault() is None and pipe.describe()["engine"]["process_restarts"] == 1


def model_processes(server_pid: int) -> list[int]:
    """The server's spawned children (the model process; tokenizers are threads on the CPU)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the model process through /proc")
def test_the_server_replaces_a_killed_model_process_and_keeps_scoring(tiny_model):
    body = {"query": "what is a cat", "documents": ["a cat is an animal", "the sky is blue", "cats purr"]}
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "model_pool.mode=process"])
    try:
        before = httpx.post(s.url + "/v1/rerank", json=body, timeout=60)
        assert before.status_code == 200
        [pid] = wait_until(lambda: model_processes(s.proc.pid))
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
                   or b"(Z)" in Path(f"/proc/{pid}/stat").read_bytes())
        time.sleep(0.5)  # the pool notices the closed pipe
        after = httpx.post(s.url + "/v1/rerank", json=body, timeout=60)  # sent to the new process
        assert after.status_code == 200 and after.json()["results"] == before.json()["results"]
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        [successor] = model_processes(s.proc.pid)
        assert successor != pid
        started = time.monotonic()
        assert s.stop() == 0 and time.monotonic() - started < 20  # a clean drain closes the model process too
        assert not Path(f"/proc/{successor}").exists() or b"(Z)" in Path(f"/proc/{successor}/stat").read_bytes()
    finally:
        s.stop()
