"""`xbench load` against a real third-party rerank server: Infinity (infinity-emb, torch engine),
serving the tiny model's folder offline. Infinity lives in its own virtualenv (`make infinity`,
which `.ci/run` runs): its pins would fight ours in one environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from test_pipeline import reference_logits
from serving import free_port

INFINITY = Path(os.environ.get("XBENCH_INFINITY", Path(__file__).parents[1] / ".venv-infinity" / "bin" / "infinity_emb"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not INFINITY.is_file(), reason=f"Infinity is not installed at {INFINITY}: "
                                 "`make infinity` builds its virtualenv (.ci/run does)")]
DOCS = ["paris is the capital and largest city of france", "bananas are yellow", "the eiffel tower is in paris"]


@pytest.fixture(scope="module")
def infinity(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("infinity") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([str(INFINITY), "v2", "--model-id", str(tiny_model), "--engine", "torch",
                                 "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Infinity exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Infinity not ready in 240 s:\n{log.read_text()[-2000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def xbench_load(*args):
    return subprocess.run([sys.executable, "-m", "xbench", "load", *args], capture_output=True, text=True, timeout=180)


def test_infinity_scores_the_same_weights_as_the_reference(infinity, tiny_model):
    r = httpx.post(infinity + "/rerank", json={"query": "capital of france", "documents": DOCS}, timeout=60)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    expected = 1 / (1 + np.exp(-reference_logits(tiny_model, [("capital of france", d) for d in DOCS])))
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], expected, atol=1e-4)


def test_xbench_load_drives_infinity_with_its_api(infinity, tmp_path):
    out = tmp_path / "infinity.json"
    proc = xbench_load(infinity, "--api", "infinity", "-b", "8", "-c", "2", "-d", "2", "--warmup", "0.5",
                       "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["params"]["api"] == "infinity" and doc["params"]["url"] == infinity + "/rerank"
    assert doc["summary"]["requests"] > 0 and doc["summary"]["errors"] == 0
    assert doc["http_status"] == {"200": doc["summary"]["requests"]}
    assert doc["summary"]["pairs"] == 8 * doc["summary"]["requests"]
    assert doc["workload"]["pair_chars"]["mean"] > 0 and "stable" in doc["stability"]


def test_the_wrong_api_stops_at_once_and_names_the_right_one(infinity, tmp_path):
    started = time.monotonic()
    proc = xbench_load(infinity, "--api", "cohere", "-d", "5", "-o", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert f"404 at /v1/rerank; /rerank answers here: try {infinity} --api infinity" in " ".join(proc.stderr.split())
    assert time.monotonic() - started < 15  # interpreter start included; the refusal itself is one request
    assert not (tmp_path / "x.json").exists()
