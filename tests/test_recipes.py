"""LLM rerankers score as their own recipes say, and no checkpoint is scored through a random head.

Each recipe is checked against a plain transformers reference written from its source: the prompt
built and tokenized the way the source does it, `AutoModelForCausalLM` run on one pair at a time
(no padding), the label logits read at the last position. Tiny random decoders of each family
(Qwen3, Qwen2 as mxbai-rerank-v2 is, Gemma as bge-reranker-v2-gemma is) are built from config here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_bert, write_tiny_decoder
from tokenizers import Tokenizer

from xbench.config import compose_config
from xbench.core.pipeline import Pipeline
from xbench.errors import ConfigError
from xbench.recipes import BGE_GEMMA, MXBAI_V2, QWEN3, QWEN3_INSTRUCTION
from xbench.workload import synthetic

FAMILY = {"qwen3-reranker": "qwen3", "mxbai-rerank-v2": "qwen2", "bge-reranker-gemma": "gemma"}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict[str, Path]:
    return {recipe: write_tiny_decoder(tmp_path_factory.mktemp(family), family, marker={"scoring": recipe})
            for recipe, family in FAMILY.items()}


def reference_ids(recipe: str, tok: Tokenizer, query: str, document: str, max_length: int) -> list[int]:
    """The prompt's token ids as the recipe's source builds them."""
    def ids(text: str, limit: int | None = None) -> list[int]:
        out = tok.encode(text, add_special_tokens=False).ids
        return out[:limit] if limit is not None else out

    if recipe == "qwen3-reranker":  # Qwen3-Reranker model card: one string between prefix and suffix
        prefix, suffix = ids(QWEN3.head[0]), ids(QWEN3.tail[0])
        text = f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
        return prefix + ids(text, max_length - len(prefix) - len(suffix)) + suffix
    if recipe == "mxbai-rerank-v2":  # mxbai_rerank_v2.py: pieces tokenized apart
        fixed = ids(MXBAI_V2.head[0]) + ids("\n") + [i for t in MXBAI_V2.tail for i in ids(t)]
        q = ids(f"query: {query}")
        d = ids(f"document: {document}", max_length - len(fixed) - len(q))
        return ids(MXBAI_V2.head[0]) + q + ids("\n") + d + [i for t in MXBAI_V2.tail for i in ids(t)]
    assert recipe == "bge-reranker-gemma"  # FlagEmbedding's FlagLLMReranker
    prompt = ids(BGE_GEMMA.tail[1])
    q = ids(f"A: {query}")
    d = ids(f"B: {document}", max_length - 1 - len(q) - 2 * len(ids("\n")) - len(prompt))
    return [tok.token_to_id("<bos>")] + q + ids("\n") + d + ids("\n") + prompt


def reference_scores(recipe: str, model_dir: Path, pairs: list[tuple[str, str]], max_length: int) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    labels = {"qwen3-reranker": ("no", "yes"), "mxbai-rerank-v2": ("0", "1"), "bge-reranker-gemma": ("Yes",)}[recipe]
    label_ids = [tok.token_to_id(label) for label in labels]
    out = []
    with torch.inference_mode():
        for q, d in pairs:
            ids = torch.tensor([reference_ids(recipe, tok, q, d, max_length)])
            logits = lm(input_ids=ids).logits[0, -1, label_ids]
            out.append(float(logits[-1] - logits[0]) if len(labels) == 2 else float(logits[0]))
    return np.asarray(out, dtype=np.float32)


def pipeline_scores(model_dir: Path, pairs: list[tuple[str, str]], *overrides: str) -> np.ndarray:
    cfg = compose_config([f"model_pool.instances.0.name={model_dir}", *overrides])
    with Pipeline.from_config(cfg) as pipe:
        return pipe.submit(pairs).result(120).logits


def long_tailed_pairs(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """One query with documents from a title to past the limit."""
    rng = np.random.default_rng(seed)
    words = " ".join(d for _, d in synthetic(64, seed=seed).pairs(64)).split()
    query = " ".join(words[:6])
    return [(query, " ".join(words[: int(rng.lognormal(3.5, 1.0)) + 1])) for _ in range(n)]


@pytest.mark.parametrize("recipe", list(FAMILY))
def test_each_recipe_scores_as_its_source_over_long_tailed_lengths(decoders, recipe):
    pairs = long_tailed_pairs(24)
    got = pipeline_scores(decoders[recipe], pairs, "model_pool.instances.0.max_length=160")
    want = reference_scores(recipe, decoders[recipe], pairs, 160)
    assert np.abs(got - want).max() <= 1e-4, (got, want)
    assert np.std(want) > 1e-3  # the pairs score differently: a test that could fail


def test_truncation_cuts_the_document_never_the_label_position(decoders):
    model = decoders["qwen3-reranker"]
    long_doc = " ".join(d for _, d in synthetic(32, seed=3).pairs(32))
    pairs = [("capital of france", long_doc)]
    cfg = compose_config([f"model_pool.instances.0.name={model}", "model_pool.instances.0.max_length=96"])
    with Pipeline.from_config(cfg) as pipe:
        template = pipe.tokenizers.template
        tail = template.layout.tail[0].tolist()
        for direction in ("right", "left"):
            enc = pipe.tokenizers.encode(pairs, direction)
            ids = enc.flat_ids.tolist()
            assert len(ids) == 96 and ids[-len(tail):] == tail and enc.truncated == 1
        right = pipe.submit(pairs).result(60).logits
        left = pipe.submit(pairs, direction="left").result(60).logits
    assert np.abs(right - reference_scores("qwen3-reranker", model, pairs, 96)).max() <= 1e-4
    assert abs(float(left[0] - right[0])) > 1e-6  # the other end of the document was kept


def test_the_query_side_is_tokenized_once_per_request(decoders, monkeypatch):
    from xbench.core import tokenizer_pool

    cfg = compose_config([f"model_pool.instances.0.name={decoders['qwen3-reranker']}"])
    with Pipeline.from_config(cfg) as pipe:
        calls: list[int] = []
        full = pipe.tokenizers._thread_tokenizer("right").full
        real = full.encode_batch_fast

        def counting(texts, *args, **kwargs):
            calls.append(sum("<Query>:" in t for t in texts))
            return real(texts, *args, **kwargs)

        monkeypatch.setattr(tokenizer_pool.Tokenizer, "encode_batch_fast", lambda self, texts, *a, **k:
                            counting(texts, *a, **k) if self is full else real.__func__(self, texts, *a, **k),
                            raising=False)
        pipe.tokenizers.encode([("one query", f"document {i}") for i in range(50)])
    assert sum(calls) == 1


@pytest.mark.parametrize("recipe", list(FAMILY))
def test_packed_and_shared_give_the_padded_unshared_scores(decoders, recipe):
    """Every way of running a decoder (packed or padded, prefix shared or not) gives the same
    scores: one query, two queries, and a batch of one."""
    one_query = long_tailed_pairs(16)
    two_queries = one_query[:8] + [("another query entirely", d) for _, d in one_query[8:]]
    plain = ("model_pool.instances.0.packed=false", "model_pool.instances.0.shared_prefix=false")
    for pairs in (one_query, two_queries, one_query[:1]):
        want = pipeline_scores(decoders[recipe], pairs, *plain)
        for packed in ("true", "false"):
            for shared in ("true", "false"):
                got = pipeline_scores(decoders[recipe], pairs, f"model_pool.instances.0.packed={packed}",
                                      f"model_pool.instances.0.shared_prefix={shared}")
                assert np.abs(got - want).max() <= 1e-4, (packed, shared)


def test_the_prefix_tree_runs_each_shared_prefix_once():
    from xbench.backends.decoder import PrefixTree

    system, qa, qb = list(range(100, 112)), list(range(200, 210)), [300, 301]
    rows = [system + qa + [1, 2, 3], system + qa + [4], system + qa + [5, 6], system + qb + [7, 8], [9, 9, 9]]
    lengths = np.array([len(r) for r in rows])
    tree = PrefixTree.of(np.concatenate(rows).astype(np.int32), lengths, min_shared=8)
    # the system prompt once, the first query once (the second is too short to run apart), five leaves
    assert tree.nodes == 7 and len(tree.ids) == 12 + 10 + 3 + 1 + 2 + 4 + 3
    for r, row in enumerate(rows):  # each pair's keys are its own tokens, in order, ending at its last
        keys = tree.ids[tree.last_keys[tree.cu_last_k[r]:tree.cu_last_k[r + 1]]]
        assert keys.tolist() == row and tree.ids[tree.last[r]] == row[-1]
        assert tree.positions[tree.last[r]] == len(row) - 1
    alone = PrefixTree.of(np.concatenate(rows).astype(np.int32), lengths, min_shared=0)
    assert alone.nodes == 5 and len(alone.ids) == lengths.sum()
    same = PrefixTree.of(np.array([1, 2, 3, 1, 2, 3], dtype=np.int32), np.array([3, 3]), min_shared=1)
    assert same.nodes == 3 and same.ids[same.last].tolist() == [3, 3]  # the last token stays in each row


def test_the_shared_prefix_is_what_every_row_begins_with_short_of_its_last_token():
    from xbench.backends.decoder import LabelScorer

    ids = torch.tensor([[1, 2, 3, 4, 9, 0], [1, 2, 3, 5, 6, 7], [1, 2, 3, 4, 8, 0]])
    mask = (torch.arange(6) < torch.tensor([[5], [6], [5]])).long()
    assert LabelScorer.shared_length(ids, mask, mask.sum(1) - 1) == 3
    assert LabelScorer.shared_length(ids[[0, 2]], mask[[0, 2]], mask[[0, 2]].sum(1) - 1) == 4
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert LabelScorer.shared_length(same, torch.ones_like(same), torch.tensor([2, 2])) == 2  # the last stays apart


def test_ten_thousand_documents_in_one_request(decoders):
    pairs = long_tailed_pairs(10_000, seed=11)
    got = pipeline_scores(decoders["mxbai-rerank-v2"], pairs)
    some = list(range(0, 10_000, 977))
    want = reference_scores("mxbai-rerank-v2", decoders["mxbai-rerank-v2"], [pairs[i] for i in some], 512)
    assert len(got) == 10_000 and np.abs(got[some] - want).max() <= 1e-4


def test_yes_no_needs_no_code_for_a_new_family(decoders):
    template = "Query: {query}\nDocument: {document}\nRelevant:"
    pairs = long_tailed_pairs(8)
    got = pipeline_scores(decoders["qwen3-reranker"], pairs, "model_pool.instances.0.scoring=yes-no",
                          f"model_pool.instances.0.template='{template}'", "model_pool.instances.0.label_tokens=[no,yes]")
    from transformers import AutoModelForCausalLM

    model = decoders["qwen3-reranker"]
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    no, yes = tok.token_to_id("no"), tok.token_to_id("yes")
    with torch.inference_mode():
        want = [(lambda lg: float(lg[yes] - lg[no]))(lm(input_ids=torch.tensor(
            [tok.encode(f"Query: {q}\nDocument:", add_special_tokens=False).ids
             + tok.encode(f" {d}", add_special_tokens=False).ids
             + tok.encode("\nRelevant:", add_special_tokens=False).ids])).logits[0, -1]) for q, d in pairs]
    assert np.abs(got - np.asarray(want)).max() <= 1e-4


def test_an_instruction_changes_the_prompt(decoders):
    pairs = long_tailed_pairs(4)
    default = pipeline_scores(decoders["qwen3-reranker"], pairs)
    other = pipeline_scores(decoders["qwen3-reranker"], pairs, "model_pool.instances.0.instruction='Find code'")
    assert np.abs(default - other).max() > 1e-5


# -- refusals -------------------------------------------------------------------------------------

def refusal(model_dir: Path, *overrides: str) -> str:
    cfg = compose_config([f"model_pool.instances.0.name={model_dir}", *overrides])
    with pytest.raises(ConfigError) as err:
        Pipeline.from_config(cfg)
    return str(err.value)


def test_a_causal_lm_without_a_recipe_is_refused_naming_scoring(tmp_path):
    model = write_tiny_decoder(tmp_path / "plain-qwen3", "qwen3")  # no marker, an unknown name
    message = refusal(model)
    assert "model_pool.instances.0.scoring=" in message and "random head" in message
    assert "qwen3-reranker" in message


def test_a_known_hub_name_picks_its_recipe(tmp_path):
    model = write_tiny_decoder(tmp_path / "Qwen3-Reranker-0.6B", "qwen3")
    cfg = compose_config([f"model_pool.instances.0.name={model}"])
    with Pipeline.from_config(cfg) as pipe:
        assert pipe.model.recipe.name == "qwen3-reranker"
        assert pipe.model.info()["scoring"]["labels"] == ["no", "yes"]


def test_an_encoder_without_head_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = write_tiny_bert(tmp_path / "headless")
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, str(model / "model.safetensors"),
              metadata={"format": "pt"})
    assert "no classification-head weights" in refusal(model)


def test_a_base_encoder_is_refused(tmp_path):
    model = write_tiny_bert(tmp_path / "base")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert "scoring=" in refusal(model)


def test_classifier_scoring_on_a_causal_lm_is_refused(decoders):
    assert "no sequence-classification head" in refusal(decoders["qwen3-reranker"],
                                                        "model_pool.instances.0.scoring=classifier")


def test_label_tokens_that_are_not_one_token_are_named(decoders):
    message = refusal(decoders["qwen3-reranker"], "model_pool.instances.0.scoring=yes-no",
                      "model_pool.instances.0.template='{query} {document}'",
                      "model_pool.instances.0.label_tokens=[no,'definitely relevant']")
    assert "'definitely relevant' is" in message and "one token" in message


@pytest.mark.parametrize("template, fragment", [("{query} only", "{document}"), ("{document} then {query}", "before")])
def test_a_bad_template_is_refused_at_compose_time(template, fragment):
    with pytest.raises(ConfigError) as err:
        compose_config(["model_pool.instances.0.scoring=yes-no", f"model_pool.instances.0.template='{template}'",
                        "model_pool.instances.0.label_tokens=[no,yes]"])
    assert fragment in str(err.value) and "model_pool.instances.0.template" in str(err.value)


def test_packed_is_refused_for_a_decoder_it_does_not_run_before_it_loads(tmp_path):
    gemma2 = write_tiny_decoder(tmp_path, "gemma2", marker={"scoring": "bge-reranker-gemma"})
    message = refusal(gemma2, "model_pool.instances.0.packed=true")
    assert "packed=true" in message and "gemma2" in message and "qwen3" in message


@pytest.mark.parametrize("backend", ["onnx", "ctranslate2", "mlx", "compiled"])
def test_backends_that_cannot_read_label_logits_refuse_in_one_line(decoders, backend):
    message = refusal(decoders["qwen3-reranker"], f"model_pool.instances.0.backend={backend}")
    assert f"backend={backend!r}" in message and "qwen3-reranker" in message and "pytorch" in message


def test_the_cli_refuses_a_causal_lm_in_one_line(tmp_path):
    import subprocess
    import sys

    model = write_tiny_decoder(tmp_path / "plain", "qwen2")
    result = subprocess.run([sys.executable, "-m", "xbench", "pipeline-bench", "-n", "4", "-o", str(tmp_path / "r.json"),
                             f"model_pool.instances.0.name={model}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "scoring=" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.json").exists()


# -- ModernBERT: a classifier family beyond BERT's ----------------------------------------------

def write_tiny_modernbert(out: Path, pooling: str = "cls") -> Path:
    """Three layers, local windows of ±8 tokens (so long-tailed pairs cross them), global every 2nd."""
    from conftest import write_tiny_model
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, global_attn_every_n_layers=2, local_attention=16,
                           max_position_embeddings=512, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                           bos_token_id=101, eos_token_id=102, num_labels=1, initializer_range=0.3,
                           classifier_pooling=pooling)
    return write_tiny_model(out, ModernBertForSequenceClassification(cfg))


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory) -> Path:
    return write_tiny_modernbert(tmp_path_factory.mktemp("modernbert"))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_modernbert_scores_as_transformers_does_packed_and_padded(tmp_path, pooling):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = write_tiny_modernbert(tmp_path, pooling)
    pairs = long_tailed_pairs(24)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = np.concatenate([model(**tok([q], [d], truncation=True, max_length=128, return_tensors="pt")).logits[:, 0]
                               .numpy() for q, d in pairs])
    assert np.std(want) > 1e-3
    for packed in ("true", "false"):
        got = pipeline_scores(model_dir, pairs, "model_pool.instances.0.max_length=128",
                              f"model_pool.instances.0.packed={packed}")
        assert np.abs(got - want).max() <= 1e-4, packed


def test_modernbert_on_openvino_scores_as_transformers_with_padding_past_its_window(tmp_path, monkeypatch):
    """Padding far from the real tokens is masked from every key in a local layer; the converted
    graph must not turn that row into NaN and carry it into the real tokens."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path / "cache"))
    model_dir = write_tiny_modernbert(tmp_path / "mb")
    pairs = long_tailed_pairs(24)
    want = pipeline_scores(model_dir, pairs, "model_pool.instances.0.max_length=128", "model_pool.instances.0.packed=false")
    got = pipeline_scores(model_dir, pairs, "model_pool.instances.0.max_length=128", "model_pool.instances.0.backend=openvino")
    assert np.abs(got - want).max() <= 1e-4


def test_int8_keeps_each_familys_last_layer_and_heads_in_fp32(modernbert, decoders):
    from transformers import AutoModelForSequenceClassification

    from xbench.backends.decoder import LabelScorer, PackedDecoder, load_causal_lm
    from xbench.backends.torch_backend import quantizable_linears

    encoder = quantizable_linears(AutoModelForSequenceClassification.from_pretrained(modernbert))
    assert encoder and not any(n.startswith(("head.", "classifier")) or ".layers.2." in n for n in encoder)
    assert any(".layers.0." in n for n in encoder)
    lm = load_causal_lm(str(decoders["qwen3-reranker"]))
    for scorer in (LabelScorer(lm, (1, 2)), PackedDecoder(lm, (1, 2))):
        decoder = [f".{n}" for n in quantizable_linears(scorer)]
        assert decoder and not any(".layers.1." in n for n in decoder) and any(".layers.0." in n for n in decoder)


def test_serve_refuses_a_random_head_with_503_failed_and_the_reason(tmp_path):
    import httpx

    from serving import start_server

    model = write_tiny_decoder(tmp_path / "plain", "qwen3")
    s = start_server([f"model_pool.instances.0.name={model}"], wait_for_health=False)
    try:
        health = s.wait_for(lambda: httpx.get(s.url + "/health").json().get("status") == "failed")
        assert health.status_code == 503 and "scoring=" in health.json()["error"]
        answer = httpx.post(s.url + "/v1/rerank", json={"query": "q", "documents": ["a"]})
        assert answer.status_code == 503 and "random head" in answer.json()["error"]["message"]
    finally:
        s.stop()


def test_info_and_results_name_the_recipe(decoders):
    import httpx

    from serving import start_server

    s = start_server([f"model_pool.instances.0.name={decoders['mxbai-rerank-v2']}"])
    try:
        info = httpx.get(s.url + "/info").json()
        answer = httpx.post(s.url + "/v1/rerank", json={"query": "q", "documents": ["a", "b c"]})
    finally:
        s.stop()
    assert info["scoring"]["recipe"] == "mxbai-rerank-v2" and info["scoring"]["labels"] == ["0", "1"]
    assert answer.status_code == 200 and len(answer.json()["results"]) == 2
