"""Hold under abuse. Hostile input never ends in a 500 or plain text: each route answers in its
own JSON shape, naming the problem, and keeps serving others. Overload is shed by estimated queue
wait, slow clients hold no slot and are cut off, and shutdown answers every accepted request."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest

from xbench.core.memory import SLACK_BYTES
from xbench.errors import DataError
from serving import closed_by_server, start_server
from xbench.workload import load_jsonl

ROUTES = {"/v1/rerank": "documents", "/v2/rerank": "documents", "/rerank": "texts"}


@pytest.fixture(scope="module")
def server(tiny_model):
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "model_pool.instances.0.max_length=64"])
    yield s
    assert s.stop() == 0


def post_raw(server, path, raw: bytes):
    return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)


def is_error_shape(path, r):
    body = r.json()
    return set(body) == {"error", "error_type"} if path == "/rerank" else set(body["error"]) == {"message", "type", "param"}


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("raw", [
    b'{"query": "q", "FIELD": ["fine", "a\\ud800b"]}',  # a lone surrogate escape in a document
    b'{"query": "q\\udfff", "FIELD": ["fine"]}',  # ... in the query
    b'{"query": "q", "FIELD": ["a\xed\xa0\x80b"]}',  # raw bytes of a surrogate
], ids=["escape-in-document", "escape-in-query", "raw-bytes"])
def test_lone_surrogates_become_the_replacement_character_and_are_scored(server, path, raw):
    r = post_raw(server, path, raw.replace(b"FIELD", ROUTES[path].encode()))
    assert r.status_code == 200, r.text


def test_lone_surrogates_with_max_tokens_per_doc(server):
    r = post_raw(server, "/v2/rerank", b'{"query": "q", "documents": ["a\\ud800 b c d"], "max_tokens_per_doc": 2}')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("raw,fragment", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"query": "q", "FIELD": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "nested too deeply"),
    (b'{"query": "q", "top_n": ' + b"7" * 5001 + b', "FIELD": ["a"]}', "not valid JSON"),
], ids=["deep-body", "deep-documents", "huge-integer"])
def test_pathological_json_is_a_400_in_the_routes_shape(server, path, raw, fragment):
    r = post_raw(server, path, raw.replace(b"FIELD", ROUTES[path].encode()))
    assert r.status_code == 400, r.text
    assert is_error_shape(path, r) and fragment in r.text
    assert post_raw(server, "/rerank", b'{"query": "q", "texts": ["still serving"]}').status_code == 200


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/rerank", 405), ("GET", "/rerank", 405), ("POST", "/health", 405), ("GET", "/nope", 404),
    ("POST", "/v3/rerank", 404),
])
def test_route_and_method_errors_answer_json(server, method, path, status):
    r = httpx.request(method, server.url + path, timeout=10)
    assert r.status_code == status and r.headers["content-type"].startswith("application/json")
    assert is_error_shape(path if path in ROUTES else "/rerank", r)


def test_a_wrong_key_is_answered_with_www_authenticate(tiny_model):
    s = start_server([f"model_pool.instances.0.name={tiny_model}"], api_key="k")
    try:
        r = httpx.post(s.url + "/rerank", json={"query": "q", "texts": ["a"]})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(s.url + "/health").status_code == 200  # /health needs no key
        # The scheme is case-insensitive and blanks around the token are ignored (RFC 7235); the
        # token itself must match exactly.
        for header, status in (("bearer k", 200), ("Bearer   k", 200), ("Bearer K", 401), ("Basic k", 401)):
            got = httpx.post(s.url + "/rerank", json={"query": "q", "texts": ["a"]}, headers={"authorization": header})
            assert got.status_code == status, header
    finally:
        s.stop()


def test_data_files_get_the_same_rules(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_bytes(b'{"query": "q", "document": "a\\ud800b"}\n')
    assert load_jsonl(f).documents == [["a\ufffdb"]]
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(DataError, match="deep.jsonl:1"):
        load_jsonl(deep)


def test_a_query_past_max_query_chars_is_413_naming_the_query(server):
    limit = httpx.get(server.url + "/info").json()["max_query_chars"]
    for path, field in ROUTES.items():
        r = httpx.post(server.url + path, json={"query": "q" * (limit + 1), field: ["a"]}, timeout=10)
        assert r.status_code == 413 and is_error_shape(path, r) and "max_query_chars" in r.text
    ok = httpx.post(server.url + "/rerank", json={"query": "q " * (limit // 2), "texts": ["a", "b"]}, timeout=30)
    assert ok.status_code == 200


def long_docs(n: int, words: int = 400) -> list[str]:
    return [f"document {i} " + "word " * words for i in range(n)]


def test_arrivals_that_outrun_the_server_are_shed_with_retry_after(tiny_model):
    # Requests of 256 long documents arrive five times as fast as the server scores them (timed
    # here on one alone), for eight times the 100 ms bound.
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "server.max_queue_wait_ms=100"])
    try:
        body = {"query": "q", "documents": long_docs(256)}
        for _ in range(3):  # warm, then time one alone
            t0 = time.perf_counter()
            assert httpx.post(s.url + "/v1/rerank", json=body, timeout=60).status_code == 200
            alone = time.perf_counter() - t0
        arrivals = 60  # over twelve times one request's service time

        async def open_loop():
            async with httpx.AsyncClient(timeout=120) as c:
                async def one(k):
                    await asyncio.sleep(alone / 5 * k)
                    t0 = time.perf_counter()
                    r = await c.post(s.url + "/v1/rerank", json=body)
                    return r, time.perf_counter() - t0
                return await asyncio.gather(*(one(k) for k in range(arrivals)))

        answered = asyncio.run(open_loop())
        shed = [(r, t) for r, t in answered if r.status_code == 429]
        scored = sorted(t for r, t in answered if r.status_code == 200)
        assert scored and len(shed) >= 15, sorted(r.status_code for r, _ in answered)
        for r, _ in shed:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "overloaded" and "max_queue_wait_ms" in r.json()["error"]["message"]
        # Shedding is a decision, not a wait: every 429 came back faster than a typical answer.
        assert max(t for _, t in shed) < scored[len(scored) // 2]
        assert httpx.post(s.url + "/v1/rerank", json={"query": "q", "documents": ["a"]}, timeout=30).status_code == 200
        metrics = httpx.get(s.url + "/metrics").text
        assert 'xbench_requests_total{route="/v1/rerank",status="429"}' in metrics
        assert "xbench_queue_wait_estimate_seconds" in metrics
    finally:
        s.stop()


def test_a_closed_loop_far_over_the_queue_wait_bound_is_never_shed(tiny_model):
    # 12 clients, each sending its next request when its last is answered: about 2 s of work
    # queued at once, ten times the 200 ms bound, yet a population the server serves at its pace.
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "server.max_queue_wait_ms=200"])
    try:
        async def closed_loop():
            async with httpx.AsyncClient(timeout=120) as c:
                async def client():
                    return [(await c.post(s.url + "/v1/rerank", json={"query": "q", "documents": long_docs(64)})).status_code
                            for _ in range(4)]
                return await asyncio.gather(*(client() for _ in range(12)))

        codes = [code for client in asyncio.run(closed_loop()) for code in client]
        assert codes == [200] * 48, sorted(codes)
    finally:
        s.stop()


def test_slow_clients_hold_no_slot_and_are_cut_off(tiny_model):
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "server.max_concurrent_requests=4",
                      "server.header_timeout_s=1.5", "server.body_timeout_s=1.5"])
    try:
        silent = [s.connect() for _ in range(20)]
        slowloris = [s.connect() for _ in range(20)]
        tricklers = [s.connect() for _ in range(20)]  # more than the 4 request slots
        for sock in slowloris:
            sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        for sock in tricklers:
            sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"query\": ")  # a body that never finishes
        # While they hang on, legitimate requests are served: no slot is taken before a body is read.
        for _ in range(8):
            r = httpx.post(s.url + "/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=10)
            assert r.status_code == 200, r.text
        time.sleep(2.5)
        for sock in silent + slowloris:
            assert closed_by_server(sock) == b""  # closed: no request line, so nothing to answer
        for sock in tricklers:
            answer = closed_by_server(sock)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
            assert b"connection: close" in answer.lower() and b"request_timeout" in answer
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        for sock in silent + slowloris + tricklers:
            sock.close()
        s.stop()


def test_past_the_connection_cap_requests_get_503_until_idle_sockets_are_cut(tiny_model):
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "server.max_connections=10",
                      "server.header_timeout_s=1"])
    try:
        held = [s.connect() for _ in range(12)]
        time.sleep(0.2)
        r = httpx.post(s.url + "/rerank", json={"query": "q", "texts": ["a"]}, timeout=10)
        assert r.status_code == 503  # answered, not left hanging
        time.sleep(1.5)  # the header deadline closes the silent sockets
        assert httpx.post(s.url + "/rerank", json={"query": "q", "texts": ["a"]}, timeout=10).status_code == 200
    finally:
        for sock in held:
            sock.close()
        s.stop()


def test_sigterm_drains_keep_alive_clients_with_no_lost_request(tiny_model):
    """Keep-alive clients in a loop across SIGTERM: every request sent is answered (200, or 503 with
    Retry-After once draining, and `Connection: close` so the next goes to a new connection); none
    is cut by a reset or an EOF; the server exits 0. (The clients honour Retry-After: one that
    connects in the very instant the drained server closes its listener can still be reset by the
    kernel, which resets connections it accepted that the process never took.)"""
    s = start_server([f"model_pool.instances.0.name={tiny_model}"])
    outcomes: list[str] = []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post(s.url + "/v1/rerank", json={"query": "q", "documents": long_docs(200, 100)})
                except httpx.ConnectError:  # refused once the server has exited: nothing was sent
                    outcomes.append("refused")
                    return
                except httpx.HTTPError as exc:  # a request sent and never answered: lost
                    outcomes.append(f"lost: {exc!r}")
                    return
                outcomes.append(f"{r.status_code}{' close' if r.headers.get('connection') == 'close' else ''}")
                if r.status_code == 503:  # back off as clients and load balancers do
                    assert r.json()["error"]["type"] == "not_ready"
                    time.sleep(int(r.headers["retry-after"]))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    stop.set()
    assert s.proc.wait(30) == 0
    assert not [o for o in outcomes if o.startswith("lost")], (outcomes, s.output()[-3000:])
    s.stop()
    assert "200" in outcomes and "200 close" in outcomes, outcomes  # in flight at SIGTERM: scored, closed


def test_a_backlog_past_the_grace_period_is_answered_503_and_the_process_exits_in_time(tiny_model):
    s = start_server([f"model_pool.instances.0.name={tiny_model}", "server.shutdown_grace_s=3",
                      "server.max_queue_wait_ms=0"])
    try:
        async def in_flight(c: httpx.AsyncClient) -> float:
            text = (await c.get(s.url + "/metrics")).text
            return next(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("xbench_requests_in_flight"))

        async def backlog():
            async with httpx.AsyncClient(timeout=60) as c:
                sends = [asyncio.ensure_future(c.post(s.url + "/rerank", json={"query": "q", "texts": long_docs(1000)}))
                         for _ in range(6)]  # ~15 s of work
                # All six admitted before SIGTERM (on a busy machine their bodies can take over a
                # second to arrive; one arriving later is refused as "shutting down", rightly).
                deadline = time.perf_counter() + 20
                while await in_flight(c) < 6 and time.perf_counter() < deadline:
                    await asyncio.sleep(0.05)
                s.proc.send_signal(signal.SIGTERM)
                t0 = time.perf_counter()
                answers = await asyncio.gather(*sends)
                return answers, time.perf_counter() - t0

        answers, answered_in = asyncio.run(backlog())
        exited = s.proc.wait(10)
        codes = [r.status_code for r in answers]
        assert 503 in codes and set(codes) <= {200, 503}, codes
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error_type"] == "Unhealthy" and "shutdown_grace_s" in r.json()["error"]
        assert answered_in < 3.0 and exited == 0
    finally:
        s.stop()


@pytest.mark.slow
def test_rss_returns_to_its_level_after_a_storm_of_large_requests():
    # The full-size model: 200 pairs at 512 tokens free ~400 MB of activations that glibc would
    # otherwise keep; the long query is tokenized once per request, not once per document. The
    # releaser trims only past SLACK_BYTES of growth, so up to that much may stay by design (CI's
    # machine kept 74 MB, this VM 18 MB).
    s = start_server(["server.max_queue_wait_ms=0"])
    try:
        docs = ["a b c"] * 16
        httpx.post(s.url + "/v1/rerank", json={"query": "q", "documents": docs}, timeout=60).raise_for_status()
        before = s.rss_mb()
        query = "query words " * 1300  # 15.6 KB, under max_query_chars
        long = [f"document {i} " + "word " * 300 for i in range(200)]

        async def storm():
            async with httpx.AsyncClient(timeout=300) as c:
                return await asyncio.gather(
                    c.post(s.url + "/v1/rerank", json={"query": query, "documents": long}),
                    *(c.post(s.url + "/rerank", json={"query": query, "texts": long * 5, "truncate": False})
                      for _ in range(4)))  # 1,000 over-long pairs each: refused once tokenized

        answers = asyncio.run(storm())
        assert [r.status_code for r in answers] == [200, 413, 413, 413, 413]  # TEI answers over-long inputs 413
        time.sleep(1.0)
        after = s.rss_mb()
        allowed = before * 1.05 + SLACK_BYTES / 2**20
        assert after <= allowed, f"RSS {before:.0f} MB before, {after:.0f} MB after (allowed {allowed:.0f})"
    finally:
        s.stop()
