"""The server's lifecycle and failure paths over real HTTP: several models and the default
alias, a model that fails to load, a forward pass that raises, and the in-process job rules."""

from __future__ import annotations

import httpx
import pytest

from conftest import write_tiny_model
from xbench.config import compose_config
from xbench.core.pipeline import Pipeline
from serving import start_server

BODY = {"query": "q", "documents": ["paris", "bananas are yellow"], "texts": ["paris", "bananas are yellow"]}


def test_several_models_behind_one_server_by_name(tiny_model, tmp_path):
    from conftest import write_tiny_bert

    other = write_tiny_bert(tmp_path / "other", seed=1)
    s = start_server([f"model_pool.instances=[{{name: '{tiny_model}'}}, {{name: '{other}'}}]"])
    try:
        info = httpx.get(s.url + "/info").json()
        assert [m["model"] for m in info["models"]] == [str(tiny_model), str(other)]
        a = httpx.post(s.url + "/v1/rerank", json={**BODY, "model": str(tiny_model), "raw_scores": True}).json()
        b = httpx.post(s.url + "/v1/rerank", json={**BODY, "model": str(other), "raw_scores": True}).json()
        assert a["model"] == str(tiny_model) and b["model"] == str(other)
        assert a["results"][0]["relevance_score"] != b["results"][0]["relevance_score"]  # two different models
        first = httpx.post(s.url + "/v1/rerank", json={k: v for k, v in BODY.items() if k != "texts"}).json()
        assert first["model"] == str(tiny_model)  # no model: the first served
        unknown = httpx.post(s.url + "/v1/rerank", json={**BODY, "model": "default"})
        assert unknown.status_code == 400 and str(other) in unknown.json()["error"]["message"]
    finally:
        s.stop()


@pytest.mark.slow
def test_the_default_alias_names_the_embedded_model():
    s = start_server([])
    try:
        r = httpx.post(s.url + "/v1/rerank", json={**BODY, "model": "default"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "xbench/minilm-l6-seeded"
    finally:
        s.stop()


def test_a_model_that_fails_to_load_is_503_failed_in_every_shape(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "architectures": ["BertForSequenceClassification"]}')
    s = start_server([f"model_pool.instances.0.name={broken}"], wait_for_health=False)
    try:
        health = s.wait_for(lambda: httpx.get(s.url + "/health").json().get("status") == "failed")
        assert health.status_code == 503 and health.json()["error"]
        v1 = httpx.post(s.url + "/v1/rerank", json=BODY)
        assert v1.status_code == 503 and v1.json()["error"]["type"] == "not_ready"
        assert "failed to load" in v1.json()["error"]["message"]
        tei = httpx.post(s.url + "/rerank", json=BODY)
        assert tei.status_code == 503 and tei.json()["error_type"] == "Unhealthy"
    finally:
        s.stop()


def test_a_forward_that_raises_is_500_in_each_shape_and_the_server_stays_healthy(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    # One token type: BERT's tokenizer marks the document with type 1, so every forward raises.
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, num_labels=1, type_vocab_size=1))
    s = start_server([f"model_pool.instances.0.name={write_tiny_model(tmp_path / 'one-type', model)}"])
    try:
        v1 = httpx.post(s.url + "/v1/rerank", json=BODY)
        assert v1.status_code == 500 and v1.json()["error"]["type"] == "backend_error"
        assert "backend error" in v1.json()["error"]["message"]
        tei = httpx.post(s.url + "/rerank", json=BODY)
        assert tei.status_code == 424 and tei.json()["error_type"] == "Backend"  # TEI's Failed Dependency
        assert httpx.get(s.url + "/health").status_code == 200  # the worker survived
    finally:
        s.stop()


def test_a_job_that_cannot_be_tokenized_fails_and_holds_no_batch_back(tiny_overrides):
    pipe = Pipeline.from_config(compose_config(tiny_overrides + ["batching.timeout_ms=10000"])).start()
    try:
        pipe.tokenizers.close()
        job = pipe.submit([("q", "d")])
        with pytest.raises(RuntimeError):
            job.result(5)
        assert pipe.batcher._incoming == 0  # its reservation went with it
    finally:
        pipe.close()


def test_the_server_key_and_the_client_key_are_different_variables(monkeypatch):
    from xbench.serve.app import RerankService

    monkeypatch.setenv("XBENCH_API_KEY", "the-clients")  # what `xbench load` sends
    monkeypatch.delenv("XBENCH_SERVER_API_KEY", raising=False)
    assert RerankService(compose_config([])).auth.key is None
    monkeypatch.setenv("XBENCH_SERVER_API_KEY", "the-servers")
    assert RerankService(compose_config([])).auth.key == "the-servers"


def test_keys_are_compared_in_constant_time(monkeypatch):
    import secrets

    from starlette.requests import Request

    from xbench.errors import ServiceError
    from xbench.serve.auth import Auth

    calls = []
    monkeypatch.setattr(secrets, "compare_digest", lambda a, b: calls.append((a, b)) or a == b)
    auth = Auth("s3cret")

    def request(header):
        return Request({"type": "http", "headers": [(b"authorization", header.encode())]})

    auth.check(request("Bearer s3cret"))
    with pytest.raises(ServiceError):
        auth.check(request("Bearer s3cre"))
    assert len(calls) == 2
