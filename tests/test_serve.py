"""The real server over real HTTP: the three rerank APIs, errors, auth, limits, metrics, clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import start_server
from test_pipeline import reference_logits

KEY = "test-secret"
DOCS = ["paris is the capital and largest city of france", "bananas are yellow", "the eiffel tower is in paris",
        "france is a country in europe", "a b c"]


@pytest.fixture(scope="module")
def server(tiny_model):
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "server.max_client_batch_size=50",
                      "server.max_body_bytes=20000", "model_pool.instances.0.max_length=64"], api_key=KEY)
    yield s
    assert s.stop() == 0


def post(server, path, body, headers=None, **kw):
    h = dict(server.headers) if headers is None else headers
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=h, timeout=60, **kw)
    return httpx.post(server.url + path, content=body, headers=h, timeout=60, **kw)


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_health_was_503_while_loading_then_200(server):
    assert server.saw_loading
    assert httpx.get(server.url + "/health").status_code == 200


def test_info_describes_the_served_model(server, tiny_model):
    info = httpx.get(server.url + "/info", headers=server.headers).json()
    assert info["model"] == str(tiny_model)
    assert info["backend"] == "pytorch" and info["precision"] == "fp32"
    assert info["max_client_batch_size"] == 50 and info["max_input_length"] == 64
    assert info["relevance_trained"] is False
    for key in ("max_batch_tokens", "max_concurrent_requests", "tokenizer_workers", "version"):
        assert key in info


def test_v1_rerank_sorts_scores_applies_top_n_and_matches_the_model(server, tiny_model):
    r = post(server, "/v1/rerank", {"model": str(tiny_model), "query": "capital of france", "documents": DOCS,
                                    "top_n": 3, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = sigmoid(reference_logits(tiny_model, [("capital of france", d) for d in DOCS], max_length=64))
    order = np.argsort(-expected)[:3]
    assert [x["index"] for x in body["results"]] == order.tolist()
    np.testing.assert_allclose([x["relevance_score"] for x in body["results"]], expected[order], atol=1e-5)
    assert [x["document"]["text"] for x in body["results"]] == [DOCS[i] for i in order]
    assert body["usage"]["total_tokens"] > 0 and body["id"]
    for h in ("x-queue-time", "x-tokenization-time", "x-inference-time", "x-compute-time", "x-compute-tokens"):
        assert h in r.headers
    assert float(r.headers["x-compute-time"]) > 0


def test_v2_rerank_truncates_documents_to_max_tokens_per_doc(server):
    long_doc = "paris " * 40
    full = post(server, "/v2/rerank", {"model": "x", "query": "q", "documents": [long_doc]})
    assert full.status_code == 400 and "served" in full.json()["error"]["message"]
    cut = post(server, "/v2/rerank", {"query": "q", "documents": [long_doc, "paris " * 3], "max_tokens_per_doc": 3})
    scores = {x["index"]: x["relevance_score"] for x in cut.json()["results"]}
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # the long doc was cut to 3 tokens
    assert "document" not in cut.json()["results"][0]


def test_tei_rerank_shape_raw_scores_and_truncate_false(server, tiny_model):
    r = post(server, "/rerank", {"query": "q", "texts": DOCS[:3], "raw_scores": True, "return_text": True})
    assert r.status_code == 200
    arr = r.json()
    assert isinstance(arr, list) and {"index", "score", "text"} <= set(arr[0])
    logits = reference_logits(tiny_model, [("q", d) for d in DOCS[:3]], max_length=64)
    np.testing.assert_allclose(sorted(x["score"] for x in arr), sorted(logits), atol=1e-5)
    over = post(server, "/rerank", {"query": "q", "texts": ["word " * 100], "truncate": False})
    assert over.status_code == 413 and over.json()["error_type"] == "Validation"  # TEI's status for it
    assert post(server, "/rerank", {"query": "q", "texts": ["word " * 100]}).status_code == 200  # truncated by default


def test_tei_truncation_direction_left_keeps_the_end_of_long_texts(server, tiny_model):
    doc = "alpha beta gamma " * 30 + "the closing words decide the score"
    scores = {}
    for direction in ("Left", "right"):
        r = post(server, "/rerank", {"query": "q", "texts": [doc], "raw_scores": True, "truncation_direction": direction})
        assert r.status_code == 200, r.text
        scores[direction.lower()] = r.json()[0]["score"]
        want = reference_logits(tiny_model, [("q", doc)], max_length=64, truncation_side=direction.lower())[0]
        assert abs(scores[direction.lower()] - want) < 1e-5
    assert abs(scores["left"] - scores["right"]) > 1e-3


def test_concurrent_requests_share_batches_and_each_gets_its_own_scores(server, tiny_model):
    queries = [f"query number {i}" for i in range(8)]

    async def go():
        async with httpx.AsyncClient(headers=server.headers, timeout=60) as c:
            return await asyncio.gather(*(c.post(server.url + "/rerank", json={"query": q, "texts": DOCS, "raw_scores": True})
                                          for q in queries))

    for q, r in zip(queries, asyncio.run(go())):
        got = {x["index"]: x["score"] for x in r.json()}
        want = reference_logits(tiny_model, [(q, d) for d in DOCS], max_length=64)
        np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, atol=1e-5)


@pytest.mark.parametrize("path,body,status,fragment", [
    ("/v1/rerank", b"{not json", 400, "not valid JSON"),
    ("/v1/rerank", {"documents": ["a"]}, 422, "`query`"),
    ("/v1/rerank", {"query": 3, "documents": ["a"]}, 422, "`query` must be a string"),
    ("/v1/rerank", {"query": "q", "documents": []}, 422, "must not be empty"),
    ("/v1/rerank", {"query": "q", "documents": "abc"}, 422, "`documents` must be an array"),
    ("/v1/rerank", {"query": "q", "documents": ["a", {"txt": "b"}]}, 422, "documents[1]"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": True}, 422, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["d"] * 51}, 413, "max_client_batch_size=50"),
    ("/v1/rerank", {"query": "q", "documents": ["x" * 30000]}, 413, "limit of 20000 bytes"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": -1}, 422, "max_tokens_per_doc"),
    ("/rerank", {"query": "q"}, 422, "texts"),
    ("/rerank", {"query": "q", "texts": [None]}, 422, "texts[0]"),
    ("/rerank", [1, 2], 422, "JSON object"),
])
def test_bad_requests_get_the_right_status_and_name_the_field(server, path, body, status, fragment):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()
    if path == "/rerank":
        assert set(err) == {"error", "error_type"} and fragment in err["error"]
    else:
        assert set(err["error"]) == {"message", "type", "param"} and fragment in err["error"]["message"]
    assert post(server, "/rerank", {"query": "q", "texts": ["still serving"]}).status_code == 200


def test_auth_is_required_everywhere_but_health(server):
    for path in ("/v1/rerank", "/rerank"):
        assert post(server, path, {"query": "q", "documents": ["a"], "texts": ["a"]}, headers={}).status_code == 401
        wrong = post(server, path, {"query": "q", "documents": ["a"], "texts": ["a"]}, headers={"authorization": "Bearer no"})
        assert wrong.status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/info").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["query", "documents", "texts", "top_n", "return_documents", "raw_scores",
                                             "truncate", "model", "max_tokens_per_doc"]),
                            st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.text(max_size=20),
                                      st.lists(st.one_of(st.text(max_size=30), st.integers(), st.none()), max_size=4))),
       path=st.sampled_from(["/v1/rerank", "/v2/rerank", "/rerank"]))
def test_fuzzed_requests_never_crash_the_server(server, body, path):
    r = post(server, path, body)
    assert r.status_code in (200, 400, 413, 422), r.text
    assert r.headers["content-type"].startswith("application/json")


def test_cohere_sdk_v1_and_v2_clients_work_unchanged(server, tiny_model):
    cohere = pytest.importorskip("cohere")
    v1 = cohere.Client(api_key=KEY, base_url=server.url)
    res = v1.rerank(model=str(tiny_model), query="capital of france", documents=DOCS, top_n=2)
    assert len(res.results) == 2 and res.results[0].relevance_score >= res.results[1].relevance_score
    v2 = cohere.ClientV2(api_key=KEY, base_url=server.url)
    res2 = v2.rerank(model=str(tiny_model), query="capital of france", documents=DOCS)
    assert sorted(r.index for r in res2.results) == list(range(len(DOCS)))


def test_metrics_are_prometheus_text_and_pass_promtool(server):
    post(server, "/v1/rerank", {"query": "q", "documents": DOCS})
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    for name in ("xbench_requests_total", "xbench_request_duration_seconds_bucket", "xbench_queue_size_pairs",
                 "xbench_batch_size_pairs_bucket", "xbench_batch_tokens_bucket", "xbench_stage_duration_seconds_bucket",
                 "xbench_pairs_total", "xbench_model_info"):
        assert name in text
    assert 'stage="tokenize"' in text and 'status="200"' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_padding_is_measured_and_compute_tokens_are_the_real_ones(server):
    """Mixed lengths in one request: x-compute-tokens and the real-token counter agree on the
    real tokens; padded tokens are counted apart; the packed backend spent nothing on padding."""
    real, padded = metric(server, "xbench_batch_real_tokens_total"), metric(server, "xbench_batch_padded_tokens_total")
    docs = ["short", "a much longer document " * 8, "mid sized document here", "x"]
    r = post(server, "/rerank", {"query": "q", "texts": docs})
    assert r.status_code == 200
    real_delta = metric(server, "xbench_batch_real_tokens_total") - real
    assert int(r.headers["x-compute-tokens"]) == real_delta
    assert metric(server, "xbench_batch_padded_tokens_total") - padded >= real_delta
    assert metric(server, "xbench_padding_efficiency") == 1.0  # packed: dense layers ran on real tokens only
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert "xbench_batch_longest_tokens_bucket" in text


def test_load_command_measures_the_server(server, tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "xbench", "load", server.url, "--api", "tei", "--api-key", KEY,
                           "-b", "8", "-c", "2", "-d", "1.5", "--warmup", "0.3", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["command"] == "load" and doc["http_status"].get("200", 0) == doc["summary"]["requests"] > 0
    assert set(doc["stages_ms"]) == {"queue", "tokenize", "infer", "rest"}  # the timing headers, and the rest


@pytest.mark.slow
def test_slo_search_finds_a_rate_that_meets_the_bound(server, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xbench", "load", server.url, "--api", "cohere", "--api-key", KEY,
                           "-b", "4", "-c", "2", "-d", "1", "--warmup", "0.2", "--slo", "p99_ms=5000", "-o", str(tmp_path),
                           "experiment.max_duration_s=1"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "highest rate meeting p99_ms=5000:" in proc.stdout and "requests/s" in proc.stdout
    docs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    open_loop = [d for d in docs if d["load"]["mode"] == "open"]
    assert open_loop and all(d["load"]["target_rate"] > 0 for d in open_loop)
    # The verdict reaches disk: every file holds the rates tried and the answer, each probe its own.
    searched = docs[0]["slo"]
    assert all(d["slo"]["tried"] == searched["tried"] and d["slo"]["best_rate"] == searched["best_rate"] for d in docs)
    assert len(searched["tried"]) == len(open_loop) and searched["best_rate"] is not None
    for d in open_loop:
        assert d["slo"]["met"] == (d["latency_ms"]["p99"] <= 5000 and d["summary"]["errors"] == 0)
    assert f"{searched['best_rate']:.3g} requests/s" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "xbench", "load", server.url, "--slo", "p42=1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--slo" in bad.stderr


def xbench_load(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "xbench", "load", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,message", [
    # no such route: the hint names the routes that answer here (one tiny probe each)
    (["PATH=/v9/rerank", "--api", "cohere"], "404 at /v9/rerank; /rerank and /v1/rerank and /v2/rerank answer here: "
                                             "try http://127.0.0.1:PORT --api cohere or --api cohere-v2 or --api jina or --api tei"),
    (["--api", "infinity"], "422 at /rerank: the server refused the infinity body"),  # TEI's route wants texts
    (["--api", "tei", "NOKEY"], "401 at /rerank: the server wants a key; pass --api-key"),
    (["--api", "nope"], "--api 'nope' is not one of cohere, cohere-v2, jina, tei, infinity, vllm, vllm-score"),
])
def test_load_checks_the_endpoint_before_any_load(server, tmp_path, args, message):
    url = server.url + (args[0].removeprefix("PATH=") if args[0].startswith("PATH=") else "")
    key = [] if "NOKEY" in args else ["--api-key", KEY]
    rest = [a for a in args if not a.startswith("PATH=") and a != "NOKEY"]
    before = metric(server, 'xbench_requests_total{route="/rerank",status="200"}')
    proc = xbench_load(url, *rest, *key, "-d", "5", "-o", str(tmp_path))
    message = message.replace("PORT", server.url.rsplit(":", 1)[1])
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("*.json"))  # nothing measured
    probes = 1 if "answer here" in message else 0
    assert metric(server, 'xbench_requests_total{route="/rerank",status="200"}') == before + probes


def test_load_stops_when_every_request_is_refused_as_wrong(server, tmp_path):
    # The pre-flight's 2 documents pass; every 60-document request is over max_client_batch_size.
    t0 = time.perf_counter()
    proc = xbench_load(server.url, "--api", "tei", "--api-key", KEY, "-b", "60", "-c", "4", "-d", "60",
                       "--warmup", "0", "-o", str(tmp_path))
    assert proc.returncode == 2 and "stopped: the last 50 requests" in proc.stderr, proc.stderr
    assert time.perf_counter() - t0 < 40


def test_client_apis_know_each_servers_answer():
    from xbench.bench.http import CLIENT_APIS, endpoint

    results = {"results": [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}]}
    tei = [{"index": 1, "score": 0.9}, {"index": 0, "score": 0.1}]
    score = {"data": [{"index": 0, "score": 0.1}, {"index": 1, "score": 0.9}]}
    for name, good in (("cohere", results), ("jina", results), ("infinity", results), ("vllm", results),
                       ("tei", tei), ("vllm-score", score)):
        api = CLIENT_APIS[name]
        assert api.answer_ok(good, 2) and not api.answer_ok(good, 3)
        assert not any(api.answer_ok(other, 2) for other in (results, tei, score) if other is not good)
    assert CLIENT_APIS["infinity"].body("q", ["a"], "m") == {"query": "q", "documents": ["a"], "model": "m"}
    assert CLIENT_APIS["vllm-score"].body("q", ["a"], "m") == {"text_1": "q", "text_2": ["a"], "model": "m"}
    assert endpoint("http://h:7997", "infinity") == "http://h:7997/rerank"
    assert endpoint("http://h:8000/", "vllm-score") == "http://h:8000/score"
    assert endpoint("http://h:8000/custom/rerank", "cohere") == "http://h:8000/custom/rerank"


def metric(server, name):
    for line in httpx.get(server.url + "/metrics", headers=server.headers).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_hung_up_clients_cost_no_compute_and_sigterm_drains_in_flight_requests():
    # The full-size model on CPU: 600 pairs take seconds, so the hang-up lands mid-request.
    s = start_server(["batching.max_batch_size=16"])
    try:
        before = metric(s, "xbench_batch_size_pairs_sum")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/rerank", json={"query": "q", "texts": ["word " * 40] * 600}, timeout=0.5)
        time.sleep(2.0)
        scored = metric(s, "xbench_batch_size_pairs_sum") - before
        assert scored < 300, f"{scored} of 600 pairs were scored after the client left"
        assert httpx.get(s.url + "/health").status_code == 200

        result = {}

        def in_flight():
            result["r"] = httpx.post(s.url + "/rerank", json={"query": "q", "texts": DOCS * 10}, timeout=60)

        t = threading.Thread(target=in_flight)
        t.start()
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()) == 50
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


@pytest.mark.slow
def test_queue_full_is_429_with_retry_after_at_once():
    s = start_server(["server.max_concurrent_requests=1"])
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(s.url + "/rerank", json={"query": "q", "texts": DOCS * 20})
                                              for _ in range(4)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 1 and 429 in codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1" and rejected.json()["error_type"] == "Overloaded"
        # At once: answered before the request holding the permit, not after waiting for it.
        answered = min(r.elapsed for r in responses if r.status_code == 200)
        assert max(r.elapsed for r in responses if r.status_code == 429) < answered
    finally:
        s.stop()
