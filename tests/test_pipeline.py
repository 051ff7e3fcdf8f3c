"""Tokenizer pool parity, pipeline score parity against a direct model call, default model."""

import json
import time

import numpy as np
import pytest
import torch

from xbench.backends.torch_backend import load_torch_model
from xbench.config import compose_config
from xbench.core.pipeline import Pipeline
from xbench.errors import InputTooLong
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.errors import ModelError
from xbench.checkpoints import materialize_default, resolve_model
from xbench.workload import synthetic


def reference_logits(model_dir, pairs, max_length=512, truncation_side="right"):
    """The direct call: HF tokenizer + HF model, one pair at a time, no padding at all."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), truncation_side=truncation_side)
    model = load_torch_model(str(model_dir))
    out = []
    with torch.inference_mode():
        for q, d in pairs:
            enc = tok(q, d, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(**enc).logits[0, 0].item())
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("direction", ["right", "left"])
def test_tokenizer_pool_matches_a_single_tokenizer(tiny_model, mode, direction):
    from transformers import AutoTokenizer

    pairs = synthetic(64, seed=1).pairs(64)
    pool = TokenizerPool(load_tokenizer(tiny_model, 48), workers=2, mode=mode, parallelism=False)
    try:
        got = [pool.submit(pairs[i:i + 16], direction).result() for i in range(0, 64, 16)]
    finally:
        pool.close()
    hf = AutoTokenizer.from_pretrained(str(tiny_model), truncation_side=direction)
    want = hf([q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=48)
    ids = [x.tolist() for enc in got for x in enc.ids]
    assert ids == want["input_ids"]
    assert max(len(x) for x in ids) == 48  # truncation to max_length happened


def test_a_dead_tokenizer_process_is_replaced_not_waited_on(tiny_model):
    """A tokenizer process that dies is replaced by a new one (its initializer loads the
    tokenizer again): the pool keeps tokenizing, and fault() stays None for /health."""
    pool = TokenizerPool(load_tokenizer(tiny_model, 48), workers=1, mode="process", parallelism=False)
    try:
        assert pool.submit([("q", "d")]).result(timeout=60).lengths.tolist() == [5]
        dead = pool._executor.pids[0]
        pool._executor._processes[0].kill()
        deadline = time.monotonic() + 30
        while pool._executor.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool._executor.pids[0] != dead and pool.fault() is None
        assert pool.submit([("q", "d")]).result(timeout=60).lengths.tolist() == [5]
    finally:
        pool.close()


@pytest.mark.parametrize("template", ["bert", "roberta"])
@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("max_length", [32, 33])
def test_each_query_is_tokenized_once_yet_pairs_match_pair_encoding(tiny_model, template, direction, max_length):
    """Every length combination around the limit (both texts over it, ties, odd budgets), for a
    BERT and a RoBERTa special-token template, cut from either side, joined by the
    post-processor or by the learned layout: token for token what encoding the pair directly
    gives, and the same count of truncated pairs."""
    from tokenizers import Tokenizer
    from tokenizers.processors import RobertaProcessing

    from xbench.core.tokenizer_pool import PairLayout, TextTokenizer, _encode, build_tokenizer

    tokenizer_json = load_tokenizer(tiny_model, max_length)
    if template == "roberta":  # <s> q </s></s> d </s>: four special tokens, one token type
        tok = Tokenizer.from_str(tokenizer_json)
        tok.post_processor = RobertaProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                               ("[CLS]", tok.token_to_id("[CLS]")))
        tokenizer_json = tok.to_str()
    tok = build_tokenizer(tokenizer_json, direction)
    texts = [" ".join(["word"] * n) for n in (0, 1, 5, 13, 14, 15, 16, 17, 28, 29, 30, 31, 32, 33, 34, 80)]
    pairs = [(q, d) for q in texts for d in texts]
    want = tok.encode_batch(pairs)
    layout = PairLayout.learn(tok)
    assert layout is not None and layout.specials == (3 if template == "bert" else 4)
    for joined_by in (None, layout):  # the post-processor per pair, or numpy per query
        got = _encode(TextTokenizer(tokenizer_json, direction), pairs, joined_by)
        assert [x.tolist() for x in got.ids] == [e.ids for e in want]
        assert [x.tolist() for x in got.type_ids] == [e.type_ids for e in want]
        assert got.truncated == sum(bool(e.overflowing) for e in want) > 0


def test_texts_skip_the_bert_normalizer_only_where_it_changes_nothing(tiny_model):
    """Printable ASCII, tabs and line breaks go to the twin without BERT's normalizer (lowercased
    here); anything else (accents, CJK, control characters, emoji, an added token's literal) to
    the full tokenizer. Every text gets the full tokenizer's ids either way, in order."""
    from xbench.core.tokenizer_pool import TextTokenizer, build_tokenizer

    tokenizer_json = load_tokenizer(tiny_model, 64)
    texts = ["Plain English, with Punctuation!", "UPPER case words", "Café crème brûlée", "naïve façade",
             "日本語のテキスト mixed", "tab\tseparated\nlines\r\n", "vertical\vtab\fform feed", "nul\x00and\x7fdel", "emoji 🙂 here", "", "   ",
             "a" * 300, "Ünïcödé ÀND ascii", "don't re-tokenize; e-mail: x@y.z (ok) [sic]",
             "a [SEP] b", "x [mask] y [Unk]", "Hello [CLS]"]  # added tokens: matched before normalizing
    texts = texts + texts[::-1]  # the two paths interleave
    full = build_tokenizer(tokenizer_json)
    fast = TextTokenizer(tokenizer_json)
    assert fast.twin is not None and fast.lowercase
    want = [e.ids for e in full.encode_batch(texts, add_special_tokens=False)]
    assert [e.ids for e in fast.encode(texts)] == want
    assert all(e.ids for e in fast.encode(texts[:8]))
    assert [list(ids) for ids in fast.encode_ids(texts)] == want  # word pieces from the cache
    assert fast._pieces and [list(ids) for ids in fast.encode_ids(texts)] == want  # now all cached


def test_cached_word_pieces_match_the_tokenizer_on_real_prose_and_code(tiny_model):
    """Passages of real English with code in it (the standard library's docstrings): every
    passage gets the full tokenizer's ids from the word-piece cache, cold and warm."""
    import pydoc

    from xbench.core.tokenizer_pool import TextTokenizer, build_tokenizer

    import pathlib
    import subprocess
    import threading

    text = " ".join(pydoc.getdoc(m) for m in (json, pathlib, subprocess, threading, pydoc, dict, str, np))
    passages = [text[i:i + 300] for i in range(0, len(text), 300)][:400]
    tokenizer_json = load_tokenizer(tiny_model, 512)
    want = [e.ids for e in build_tokenizer(tokenizer_json).encode_batch(passages, add_special_tokens=False)]
    fast = TextTokenizer(tokenizer_json)
    assert sum(map(fast._plain, passages)) > len(passages) // 2  # most take the cached path
    for _ in range(2):
        assert [list(ids) for ids in fast.encode_ids(passages)] == want


@pytest.mark.parametrize(("device", "mode"), [("cpu", "thread"), ("cuda", "process"), ("cuda:1", "process")])
def test_auto_tokenizer_mode_uses_processes_beside_a_cuda_model(tiny_model, device, mode):
    cfg = compose_config([f"model_pool.instances.0.name={tiny_model}"]).tokenizer_pool
    assert cfg.mode == "auto"
    pool = TokenizerPool.for_model(tiny_model, 64, cfg, device)
    try:
        assert pool.mode == mode
        assert pool.submit([("q", "a document")]).result(timeout=60).lengths.tolist() == [6]  # [CLS] q [SEP] a document [SEP]
    finally:
        pool.close()


@pytest.mark.parametrize("overrides", [
    [],
    ["batching.max_batch_size=5", "batching.max_batch_tokens=400"],
    ["batching.length_bucketing=false", "model_pool.workers=2", "tokenizer_pool.workers=2"],
    ["batching.enabled=false"],
    ["tokenizer_pool.mode=process", "tokenizer_pool.workers=2"],  # ids cross processes as flat arrays
    ["model_pool.mode=process", "model_pool.workers=2"],  # batches and scores cross to the model process
])
def test_pipeline_scores_match_direct_model_call_in_order(tiny_model, tiny_overrides, overrides):
    cfg = compose_config(tiny_overrides + overrides)
    w = synthetic(256, seed=2)
    requests = [w.request(i, 7 + i) for i in range(6)]  # uneven sizes, mixed in batches
    with Pipeline.from_config(cfg) as pipe:
        futures = [pipe.submit(r.pairs) for r in requests]
        results = [f.result(timeout=60) for f in futures]
    for r, res in zip(requests, results):
        np.testing.assert_allclose(res.logits, reference_logits(tiny_model, r.pairs), atol=1e-5)
        assert set(res.stages_s) == {"queue", "tokenize", "infer"}
        assert res.total_tokens > len(r.pairs)


def test_empty_request_resolves_at_once(tiny_overrides):
    with Pipeline.from_config(compose_config(tiny_overrides)) as pipe:
        assert len(pipe.submit([]).result(timeout=5).logits) == 0


def test_overlong_pairs_with_truncation_off_fail_before_the_model(tiny_overrides):
    batches = []
    cfg = compose_config(tiny_overrides + ["model_pool.instances.0.max_length=32"])
    with Pipeline.from_config(cfg, observe_batch=lambda batch, seconds: batches.append(batch.rows)) as pipe:
        with pytest.raises(InputTooLong, match="2 input"):
            pipe.submit([("q", "word " * 50), ("q", "short"), ("q", "word " * 40)], truncate=False).result(timeout=10)
        assert batches == []  # nothing reached the model
        assert len(pipe.submit([("q", "short")], truncate=False).result(timeout=10).logits) == 1
        assert pipe.submit([("q", "word " * 50)]).result(timeout=10).truncated == 1  # truncation on: cut, scored


def test_a_backend_that_returns_nan_fails_its_batch_loudly_and_the_next_one_is_scored(tiny_overrides, monkeypatch):
    from xbench.backends.torch_backend import TorchBackend
    from xbench.errors import NonFiniteScores

    real = TorchBackend.forward_packed
    poisoned = {"nan": True}

    def forward_packed(self, *args):
        logits = real(self, *args)
        if poisoned["nan"]:
            logits[1] = np.nan
        return logits

    with Pipeline.from_config(compose_config(tiny_overrides)) as pipe:
        monkeypatch.setattr(TorchBackend, "forward_packed", forward_packed)
        with pytest.raises(NonFiniteScores, match=r"backend torch-eager returned 1 non-finite score\(s\) in a batch of \d+ pairs"):
            pipe.submit([("q", "a"), ("q", "b c"), ("q", "d e f")]).result(timeout=10)
        poisoned["nan"] = False
        assert np.isfinite(pipe.submit([("q", "a"), ("q", "b c")]).result(timeout=10).logits).all()


def test_default_model_is_the_bundled_encoder_with_a_reproducible_head(tmp_path, monkeypatch):
    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path / "a"))
    a = materialize_default()
    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path / "b"))
    b = materialize_default()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    m = resolve_model("xbench/minilm-l6-seeded")
    assert m.relevance_trained is False and m.num_layers == 6 and m.hidden_size == 384
    assert "not relevance-trained" in m.note
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]


def test_unreachable_hub_id_names_the_offline_default():
    with pytest.raises(ModelError, match="xbench/minilm-l6-seeded") as err:
        resolve_model("cross-encoder/ms-marco-MiniLM-L-6-v2-does-not-exist")
    assert "local directory" in str(err.value)


def test_local_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("parallelism", [False, True])
def test_parallelism_switch_reaches_the_workers(tiny_model, monkeypatch, mode, parallelism):
    import os

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true" if not parallelism else "false")  # the opposite
    pool = TokenizerPool(load_tokenizer(tiny_model, 32), workers=1, parallelism=parallelism, mode=mode)
    try:
        if mode == "process":  # read in the worker process itself
            seen = pool._executor.submit(os.getenv, "TOKENIZERS_PARALLELISM").result()
        else:
            seen = os.environ.get("TOKENIZERS_PARALLELISM")
        assert seen == ("true" if parallelism else "false")
    finally:
        pool.close()


def test_the_backlog_counts_a_jobs_tokens_until_they_are_scored(tiny_overrides):
    from xbench.core.backlog import Backlog

    backlog = Backlog(workers=2)
    assert backlog.wait_s() == 0.0  # no rate known yet: nothing is refused on a guess
    backlog.observe_batch(real_tokens=500, seconds=0.5)  # 1,000 tokens/s per worker
    backlog.add(4000)
    assert backlog.wait_s() == pytest.approx(2.0)

    with Pipeline.from_config(compose_config(tiny_overrides)) as pipe:
        assert pipe.backlog.tokens_per_s > 0  # seeded from the calibrated cost model
        pairs = synthetic(64, seed=3).pairs(64)
        jobs = [pipe.submit(pairs) for _ in range(4)]
        assert pipe.backlog.tokens > 0
        jobs[-1].cancel()
        for job in jobs[:-1]:
            job.result(60)
        deadline = time.time() + 10
        while pipe.backlog.tokens > 1e-6 and time.time() < deadline:
            time.sleep(0.01)
        assert pipe.backlog.tokens == pytest.approx(0.0, abs=1e-6)  # scored or cancelled: nothing owed
