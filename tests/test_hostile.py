"""Hostile input never ends in a 500 or plain text: each route answers in its own JSON shape,
naming the problem, and keeps serving others. (Issue #11's input cases; more to come.)"""

from __future__ import annotations

import httpx
import pytest

from xbench.errors import DataError
from xbench.serve.process import start_server
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
