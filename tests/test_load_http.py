"""`xbench load` against servers that will not serve it: it stops at once on a wrong endpoint,
waits out Retry-After when shed, and never exits 0 when nothing succeeded. The servers are real
HTTP servers on loopback ports; `xbench load` runs as a user runs it, in a subprocess."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest


@contextmanager
def answering(status: int, headers: dict[str, str] | None = None) -> Iterator[tuple[str, list[float]]]:
    """A loopback server answering every POST with `status` (and `headers`); yields its URL and
    the times of the POSTs it got."""
    posts: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            posts.append(time.monotonic())
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b'{"message": "no"}'
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", posts
    finally:
        server.shutdown()
        server.server_close()


def load(url: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xbench", "load", url, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("status", [501, 500, 502, 404, 400, 503])
def test_a_first_answer_that_is_not_a_busy_server_stops_at_once(tmp_path, status):
    with answering(status) as (url, posts):  # a 503 without Retry-After is a broken server, not a busy one
        t0 = time.monotonic()
        result = load(url, "-d", "30", "-o", str(tmp_path / "r.json"), cwd=tmp_path)
        took = time.monotonic() - t0
    assert result.returncode == 2, result.stderr
    assert f"{status} at /v1/rerank" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 400  # one line, an HTML page folded into it
    assert took < 15 and len(posts) <= 8 and not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_shed_clients_wait_out_retry_after_and_a_run_with_no_success_fails(tmp_path):
    with answering(429, {"Retry-After": "1"}) as (url, posts):
        result = load(url, "-c", "2", "-d", "1", "--warmup", "0", "-o", str(tmp_path / "honour.json"), cwd=tmp_path)
        honoured = len(posts)
        posts.clear()
        rushed = load(url, "-c", "2", "-d", "1", "--warmup", "0", "--no-retry-after",
                      "-o", str(tmp_path / "rush.json"), cwd=tmp_path)
        ignored = len(posts)
    for run in (result, rushed):
        assert run.returncode == 1, run.stderr
        assert "no request succeeded" in run.stderr and "most requests were shed" in run.stdout
    # Two clients over a 3 s time limit, each waiting 1 s after every 429, send about 8 requests;
    # told to ignore it, they send as fast as the server answers.
    assert 2 <= honoured <= 12 and ignored > 5 * honoured, (honoured, ignored)
    assert (tmp_path / "honour.json").exists()  # the run is recorded: it says what the server did


# -- loads like production: request sizes, bursts, goodput, records -------------------------------

def test_request_sizes_follow_their_distribution_the_same_on_every_run():
    from xbench.workload import RequestSizes, synthetic

    uniform = RequestSizes("10:200", seed=3)
    draws = [uniform.draw(i) for i in range(2000)]
    assert min(draws) >= 10 and max(draws) <= 200 and 90 < sum(draws) / len(draws) < 120
    assert draws == [RequestSizes("10:200", seed=3).draw(i) for i in range(2000)]
    skewed = [RequestSizes("lognormal:mean=50,sd=30,max=400").draw(i) for i in range(4000)]
    assert 45 < sum(skewed) / len(skewed) < 55 and max(skewed) > 120  # a long tail
    workload = synthetic(64)
    workload.sizes = uniform
    assert [len(workload.request(i, 32).documents) for i in range(50)] == draws[:50]


@pytest.mark.parametrize("spec", ["10:", "lognormal:mean=50", "lognormal:mean=-1,sd=2", "200:10", "gamma:1"])
def test_a_malformed_distribution_is_one_line_naming_it(tmp_path, spec):
    with answering(200) as (url, posts):
        result = load(url, "-b", spec, "-d", "1", "-o", str(tmp_path / "r.json"), cwd=tmp_path)
    assert result.returncode == 2 and "--batch" in result.stderr and spec in result.stderr
    assert "Traceback" not in result.stderr and not posts and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("clause", ["p99_ms<=500", "latency_ms<500", "latency_ms<=fast", "queue_ms<=-1"])
def test_a_malformed_goodput_clause_is_one_line_naming_it(tmp_path, clause):
    with answering(200) as (url, posts):
        result = load(url, "--goodput", clause, "-d", "1", cwd=tmp_path)
    assert result.returncode == 2 and clause in result.stderr and "latency_ms" in result.stderr and not posts


def test_burstier_arrivals_clump_at_the_same_mean_rate():
    import numpy as np

    def gaps(burstiness):
        rng = np.random.Generator(np.random.PCG64(0))
        return rng.gamma(burstiness, 1.0 / (10 * burstiness), 20000)

    poisson, bursty = gaps(1.0), gaps(0.25)
    assert abs(poisson.mean() - 0.1) < 0.005 and abs(bursty.mean() - 0.1) < 0.005
    assert bursty.std() > 1.8 * poisson.std()  # coefficient of variation 1/sqrt(B): 2x at B = 0.25


def test_goodput_and_records_against_a_real_server(tmp_path, tiny_model):
    import json

    from serving import start_server

    s = start_server([f"model_pool.instances.0.name={tiny_model}"])
    try:
        records = tmp_path / "requests.jsonl"
        result = load(s.url, "-b", "5:40", "-c", "2", "-n", "30", "--warmup", "0", "--goodput",
                      "latency_ms<=60000,queue_ms<=60000", "--records", str(records), "-o", str(tmp_path / "r.json"),
                      cwd=tmp_path)
    finally:
        s.stop()
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["goodput"]["fraction"] == 1.0 and doc["goodput"]["good"] == 30
    sent = doc["workload"]["docs_per_request"]
    assert sent["spec"] == "5:40" and 5 <= sent["min"] <= sent["max"] <= 40 and sent["min"] < sent["max"]
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 30 and all(line["status"] == 200 for line in lines)
    assert {"start_s", "end_s", "latency_ms", "queue_ms", "tokenize_ms", "infer_ms", "rest_ms", "documents"} <= set(lines[0])
    assert sorted(line["documents"] for line in lines) != [lines[0]["documents"]] * 30  # sizes vary
    assert set(doc["stages_ms"]) >= {"queue", "tokenize", "infer", "rest"}
    assert "where the time went" in result.stdout
    # The records are enough to measure the run again, elsewhere.
    again = subprocess.run([sys.executable, "-m", "xbench", "report", str(records), "-f", "json"], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    row = json.loads(again.stdout)[0]
    assert row["requests"] == 30 and row["p50_ms"] == pytest.approx(doc["latency_ms"]["p50"], abs=0.01)  # µs-rounded times
    assert row["concurrency"] == 2


def test_a_trace_replays_at_its_own_times(tmp_path, tiny_model):
    import json

    from serving import start_server

    trace = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 1000 + 0.05 * i, "query": f"query {i % 3}", "documents": [f"doc {j}" for j in range(1 + i % 5)]}
             for i in range(40)]
    trace.write_text("\n".join(json.dumps(line) for line in lines))
    s = start_server([f"model_pool.instances.0.name={tiny_model}"])
    try:
        result = load(s.url, "--trace", str(trace), "--speedup", "2", "--records", str(tmp_path / "r.jsonl"),
                      "-o", str(tmp_path / "r.json"), cwd=tmp_path)
    finally:
        s.stop()
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["load"]["mode"] == "trace" and doc["summary"]["requests"] == 40
    assert doc["load"]["span_s"] == pytest.approx(0.975) and doc["load"]["send_lag_ms"]["p50"] < 50
    sent = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [line["documents"] for line in sent] == [len(line["documents"]) for line in lines]  # as recorded
    starts = [line["start_s"] for line in sent]
    assert starts == pytest.approx([0.025 * i for i in range(40)], abs=1e-6)  # due times, at twice the speed


@pytest.mark.parametrize("line, fragment", [
    ('{"timestamp": 5, "query": "q", "documents": ["d"]}', "goes back"),
    ('{"timestamp": "soon", "query": "q", "documents": ["d"]}', '"timestamp"'),
    ('{"timestamp": 9, "documents": ["d"]}', '"query"'),
])
def test_a_bad_trace_line_is_named(tmp_path, line, fragment):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 7, "query": "q", "documents": ["d"]}\n' + line + "\n")
    with answering(200) as (url, posts):
        result = load(url, "--trace", str(trace), cwd=tmp_path)
    assert result.returncode == 2 and f"{trace}:2" in result.stderr and fragment in result.stderr
    assert not posts and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_ramp_measures_one_point_per_rate_step_and_draws_them(tmp_path, tiny_model):
    import json

    from serving import start_server

    s = start_server([f"model_pool.instances.0.name={tiny_model}"])
    try:
        result = load(s.url, "-b", "4", "--ramp", "4:20:3", "--steps", "3", "--goodput", "latency_ms<=10000",
                      "-o", str(tmp_path / "ramp"), cwd=tmp_path)
    finally:
        s.stop()
    assert result.returncode == 0, result.stderr
    docs = [json.loads(p.read_text()) for p in sorted((tmp_path / "ramp").glob("*.json"))]
    assert sorted(d["params"]["rate"] for d in docs) == [4.0, 12.0, 20.0]
    assert all(d["goodput"]["requests"] > 0 for d in docs) and (tmp_path / "ramp" / "ramp.png").stat().st_size > 0


@pytest.mark.parametrize("ramp", ["4:20", "0:20:3", "a:b:c"])
def test_a_malformed_ramp_is_one_line(tmp_path, ramp):
    with answering(200) as (url, posts):
        result = load(url, "--ramp", ramp, cwd=tmp_path)
    assert result.returncode == 2 and "--ramp" in result.stderr and not posts


def test_records_as_parquet_are_measured_again_by_report(tmp_path, tiny_model):
    import json

    pytest.importorskip("pyarrow")
    from serving import start_server

    s = start_server([f"model_pool.instances.0.name={tiny_model}"])
    try:
        records = tmp_path / "requests.parquet"
        result = load(s.url, "-b", "4", "-c", "2", "-n", "12", "--warmup", "0", "--records", str(records),
                      "-o", str(tmp_path / "r.json"), cwd=tmp_path)
    finally:
        s.stop()
    assert result.returncode == 0, result.stderr
    again = subprocess.run([sys.executable, "-m", "xbench", "report", str(records), "-f", "json"], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    row = json.loads(again.stdout)[0]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert row["requests"] == 12 and row["p50_ms"] == pytest.approx(doc["latency_ms"]["p50"], abs=0.01)
