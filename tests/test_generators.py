"""Several load generators: the schedule split, the histogram merge, and a real run against the
real server in which the merged document equals the sum of its parts."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest

from xbench.bench.generators import encode, histogram, merge, split
from xbench.bench.load import LoadSpec
from xbench.errors import ConfigError
from serving import start_server

# HdrHistogram merges the parts' latencies; it comes with the ray extra, which .ci/run installs.
needs_hdrh = pytest.mark.skipif(find_spec("hdrh") is None, reason="needs hdrhistogram: pip install -e '.[ray]'")


def test_split_shares_concurrency_or_rate_and_seeds_each_part():
    parts = split(LoadSpec(concurrency=5, duration_s=3), 2)
    assert [p.concurrency for p in parts] == [3, 2] and [p.seed for p in parts] == [0, 1]
    assert all(p.max_duration_s == 3 for p in parts)  # a fixed duration: parts cannot agree to stop
    parts = split(LoadSpec(rate=9.0, duration_s=3), 3)
    assert [p.rate for p in parts] == [3.0] * 3 and len({p.seed for p in parts}) == 3
    with pytest.raises(ConfigError, match="more than --concurrency"):
        split(LoadSpec(concurrency=1), 2)
    with pytest.raises(ConfigError, match="--requests"):
        split(LoadSpec(concurrency=4, requests=10), 2)


def part(latencies_s, pairs=4, duration=2.0):
    n = len(latencies_s)
    return {"host": "h", "pid": 1, "latency": encode(histogram(latencies_s)), "stages": {},
            "load": {"mode": "closed", "measured_s": duration},
            "summary": {"requests": n, "pairs": n * pairs, "errors": 0, "duration_s": duration, "tokens_per_s": 0.0},
            "latency_ms": {"p50": float(np.percentile(np.asarray(latencies_s) * 1000, 50))},
            "http_status": {"200": n}, "error_samples": {}, "bins": [n * pairs / 20] * 20}


@needs_hdrh
def test_merge_adds_counts_and_merges_histograms_exactly():
    rng = np.random.default_rng(0)
    fast, slow = rng.uniform(0.01, 0.02, 400), rng.uniform(0.05, 0.06, 200)
    out = merge([part(list(fast)), part(list(slow))], LoadSpec(concurrency=2, duration_s=2.0, windows=4))
    assert out["summary"]["requests"] == 600 and out["summary"]["pairs"] == 2400
    assert out["http_status"] == {"200": 600}
    everything = np.concatenate([fast, slow]) * 1000
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):  # HdrHistogram: 3 significant digits
        assert out["latency_ms"][key] == pytest.approx(np.percentile(everything, q), rel=0.01)
    assert out["summary"]["pairs_per_s"] == pytest.approx(1200)
    assert out["stability"]["stable"] and out["stability"]["windows"] == 4
    lo, hi = out["confidence"]["latency_ms"]["p50"]
    assert lo <= out["latency_ms"]["p50"] <= hi


@pytest.fixture(scope="module")
def server(tiny_model):
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "model_pool.instances.0.max_length=64"])
    yield s
    assert s.stop() == 0


def load(*args):
    return subprocess.run([sys.executable, "-m", "xbench", "load", *args], capture_output=True, text=True, timeout=300)


@needs_hdrh
def test_two_generators_merge_into_the_sum_of_their_parts(server, tmp_path):
    out = tmp_path / "two.json"
    proc = load(server.url, "--generators", "2", "-b", "4", "-c", "4", "-d", "1.5", "--warmup", "0.5", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    parts = doc["generators"]
    assert len(parts) == 2 and len({p["pid"] for p in parts}) == 2
    assert [p["load"]["concurrency"] for p in parts] == [2, 2]
    assert doc["summary"]["requests"] == sum(p["summary"]["requests"] for p in parts) > 0
    assert doc["summary"]["pairs"] == sum(p["summary"]["pairs"] for p in parts)
    assert doc["http_status"] == {"200": doc["summary"]["requests"]}
    # Percentiles interpolate between order statistics, so a merged one cannot fall below the
    # lowest part's, but may rise above the highest part's up to the next order statistic: two
    # parts of 101 requests, each with one stall, have p99s at their second-slowest request while
    # the merged p99 (202 requests) lies 99% of the way to a stall. So the bound above is the
    # parts' next percentile up (a bound for p50 once a part holds 3 requests) or their maximum
    # (HdrHistogram reports a bucket's top value: up to 0.1% high).
    lat = [p["latency_ms"] for p in parts]
    assert min(x["p50"] for x in lat) * 0.999 <= doc["latency_ms"]["p50"] <= max(x["p90"] for x in lat) * 1.002
    assert min(x["p99"] for x in lat) * 0.999 <= doc["latency_ms"]["p99"] <= max(x["max"] for x in lat) * 1.002
    assert doc["params"]["generators"] == 2 and "2 generators" in proc.stdout


@pytest.mark.slow
@needs_hdrh
def test_at_low_load_two_generators_measure_what_one_does(server, tmp_path):
    docs = {}
    for n in (1, 2):
        out = tmp_path / f"g{n}.json"
        proc = load(server.url, "--generators", str(n), "-b", "4", "--rate", "16", "-d", "2", "--warmup", "0.5",
                    "experiment.max_duration_s=2", "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        docs[n] = json.loads(out.read_text())
    one, two = docs[1], docs[2]
    assert two["summary"]["pairs_per_s"] == pytest.approx(one["summary"]["pairs_per_s"], rel=0.4)
    # within this VM's run-to-run noise on the tiny model (p50 moves up to ~2x between identical
    # runs of ~25 requests; these hold ~32)
    assert two["latency_ms"]["p50"] == pytest.approx(one["latency_ms"]["p50"], rel=1.0)
    assert two["summary"]["errors"] == one["summary"]["errors"] == 0


@needs_hdrh
def test_bad_generator_options_are_one_line_errors(server):
    proc = load(server.url, "--generators", "3", "-c", "2")
    assert proc.returncode == 2 and "--generators 3 is more than --concurrency 2" in proc.stderr
    proc = load(server.url, "--ray", "auto")
    assert proc.returncode == 2 and "--generators N" in proc.stderr
