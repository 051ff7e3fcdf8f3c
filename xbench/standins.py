"""Seeded stand-ins for rerankers this machine cannot download: the exact architecture, so every
throughput and latency figure transfers, with weights drawn from a fixed seed (numpy PCG64: every
machine gets the same model). Their scores are not relevance-trained; results say so.

- `xbench/qwen3-reranker-0.6b-seeded`: Qwen3-Reranker-0.6B's configuration (Qwen3ForCausalLM,
  28 layers, hidden 1024, 16 query heads, 8 key-value heads, head_dim 128, tied embeddings),
  scored by the qwen3-reranker recipe. Its tokenizer is Qwen's byte-level BPE: the 151,643 ranks
  shipped in the PyPI package dashscope (`resources/qwen.tiktoken`, the vocabulary Qwen2 and Qwen3
  share) with Qwen3's 26 special tokens after them and Qwen2's pre-tokenizer, so prompts cost the
  tokens they cost the real model.
- `xbench/modernbert-base-seeded`: ModernBERT-base's configuration (22 layers, hidden 768, 12 heads,
  local attention of 128 tokens in two layers of three) as a one-logit
  ModernBertForSequenceClassification, the shape of gte-reranker-modernbert-base. No PyPI package
  ships ModernBERT's own BPE, so its tokenizer is a stated stand-in: the default model's BERT
  WordPiece (30,522 entries, about as many tokens per English word); the embedding table is sized
  to it, which leaves the encoder's cost per token unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from xbench.errors import ModelError

QWEN3_STANDIN = "xbench/qwen3-reranker-0.6b-seeded"
STANDIN_SEED = 20261202
WEIGHT_STD = 0.02  # Qwen3's initializer_range

QWEN3_RERANKER_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "use_cache": False, "use_sliding_window": False, "vocab_size": 151669,
}
# Qwen3's special tokens, from id 151643 on (its tokenizer_config.json's added_tokens_decoder).
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                 "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def qwen_tokenizer(out: Path) -> None:
    """tokenizer.json and tokenizer_config.json of Qwen's BPE, from dashscope's tiktoken ranks."""
    spec = importlib.util.find_spec("dashscope")  # found, not imported: only its data file is read
    ranks = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken" if spec else None
    if ranks is None or not ranks.is_file():
        raise ModelError(f"{QWEN3_STANDIN} takes Qwen's tokenizer from the PyPI package dashscope: "
                         "pip install 'xbench[standins]'")
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_SPLIT).converted()
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated",
                                                                      invert=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    first = tok.get_vocab_size()
    if first != 151643:
        raise ModelError(f"dashscope's qwen.tiktoken holds {first} ranks, not Qwen's 151,643")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_SPECIAL])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2TokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": 131072}, indent=2))


def seeded_weights(config: dict, seed: int) -> dict:
    """Every tensor of a Qwen3ForCausalLM drawn in a fixed order from one PCG64 stream: weights
    N(0, 0.02), RMSNorm scales one (tied embeddings: no lm_head)."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    h, heads, kv, hd = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    inter = config["intermediate_size"]

    def normal(*shape: int) -> "np.ndarray":
        return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(config["vocab_size"], h),
               "model.norm.weight": np.ones(h, dtype=np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": normal(heads * hd, h), p + "self_attn.k_proj.weight": normal(kv * hd, h),
            p + "self_attn.v_proj.weight": normal(kv * hd, h), p + "self_attn.o_proj.weight": normal(h, heads * hd),
            p + "self_attn.q_norm.weight": np.ones(hd, dtype=np.float32),
            p + "self_attn.k_norm.weight": np.ones(hd, dtype=np.float32),
            p + "mlp.gate_proj.weight": normal(inter, h), p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": np.ones(h, dtype=np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, dtype=np.float32),
        })
    return tensors


def write_qwen3_standin(out: Path) -> None:
    from safetensors.numpy import save_file

    qwen_tokenizer(out)
    (out / "config.json").write_text(json.dumps({**QWEN3_RERANKER_06B, "torch_dtype": "float32"}, indent=2))
    save_file(seeded_weights(QWEN3_RERANKER_06B, STANDIN_SEED), str(out / "model.safetensors"), metadata={"format": "pt"})
    note = (f"Qwen3-Reranker-0.6B's architecture (Qwen3ForCausalLM, 28 layers, hidden 1024, 16 heads, 8 KV heads) "
            f"with weights drawn from seed {STANDIN_SEED}, and Qwen's BPE (dashscope's qwen.tiktoken, the vocabulary "
            "Qwen3 shares) with Qwen3's special tokens: speed figures transfer; its scores are not relevance-trained.")
    (out / "xbench_model.json").write_text(json.dumps({"relevance_trained": False, "seed": STANDIN_SEED,
                                                       "scoring": "qwen3-reranker", "note": note,
                                                       "tokenizer": "Qwen BPE from dashscope's qwen.tiktoken"}, indent=2))


MODERNBERT_STANDIN = "xbench/modernbert-base-seeded"
MODERNBERT_BASE = {
    "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22, "num_attention_heads": 12,
    "global_attn_every_n_layers": 3, "local_attention": 128, "max_position_embeddings": 8192,
    "global_rope_theta": 160000.0, "local_rope_theta": 10000.0, "hidden_activation": "gelu",
    "num_labels": 1,
}


def seed_every_tensor(model, seed: int) -> None:
    """Overwrite a model's every tensor, in name order, from one PCG64 stream: matrices N(0, 0.02),
    norm scales one, biases zero, so the weights are the same on every machine and torch version."""
    import numpy as np
    import torch

    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if tensor.dim() >= 2:
                tensor.copy_(torch.from_numpy(rng.standard_normal(tuple(tensor.shape), dtype=np.float32) * WEIGHT_STD))
            elif name.endswith("bias"):
                tensor.zero_()
            else:
                tensor.fill_(1.0)


def write_modernbert_standin(out: Path) -> None:
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from xbench.checkpoints import materialize_default

    bert = materialize_default()
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (bert / name).is_file():
            shutil.copy(bert / name, out / name)
    config = ModernBertConfig(vocab_size=30522, pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101,
                              eos_token_id=102, **MODERNBERT_BASE)
    model = ModernBertForSequenceClassification(config).eval()
    seed_every_tensor(model, STANDIN_SEED)
    model.save_pretrained(out, safe_serialization=True)
    note = (f"ModernBERT-base's architecture (22 layers, hidden 768, 12 heads, local attention 128) as a one-logit "
            f"classifier, weights drawn from seed {STANDIN_SEED}; tokenizer: BERT's WordPiece (a stated stand-in for "
            "ModernBERT's BPE). Speed figures transfer; its scores are not relevance-trained.")
    (out / "xbench_model.json").write_text(json.dumps({"relevance_trained": False, "seed": STANDIN_SEED, "note": note,
                                                       "tokenizer": "BERT WordPiece (stand-in)"}, indent=2))


STANDINS: dict[str, tuple[str, Callable[[Path], None]]] = {
    QWEN3_STANDIN: ("qwen3-reranker-0.6b-seeded-v1", write_qwen3_standin),
    MODERNBERT_STANDIN: ("modernbert-base-seeded-v1", write_modernbert_standin),
}


def materialize(name: str, cache: Path) -> Path:
    """Write the stand-in `name` to the cache once (atomically); return its folder."""
    folder, write = STANDINS[name]
    target = cache / "models" / folder
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
