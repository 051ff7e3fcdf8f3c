"""MLX backend: BERT written in MLX, weights read from the model's safetensors; no torch at
inference. The layer names map one to one onto the HF checkpoint's. On Apple Silicon it runs
on the GPU; on Linux `mlx[cpu]` runs it on the CPU (correct but slow there).

int8/int4: MLX affine quantization (group size 64, or 32 for narrow models) of the encoder's Linear layers; the
embeddings, pooler and 1-logit head stay in the base precision.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from xbench.backends.base import MIXED, relevance
from xbench.checkpoints import num_labels

log = logging.getLogger(__name__)
_warned: list[bool] = []


def _say_slow_once() -> None:
    if not _warned:
        _warned.append(True)
        log.warning("mlx runs here on its CPU path, a slow reference (about 1.5 pairs/s on the default model "
                    "on 2 cores): it is the fast path on Apple Silicon (device=mps); use pytorch or onnx on this machine")


DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16, "int8": mx.float32, "int4": mx.float32}
QUANT_BITS = {"int8": 8, "int4": 4}


class Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c["type_vocab_size"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def __call__(self, ids: mx.array, types: mx.array) -> mx.array:
        pos = mx.arange(ids.shape[1])[None, :]
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)


class DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        setattr(self, "self", SelfAttention(c))
        self.output = DenseNorm(c["hidden_size"], c["hidden_size"], c["layer_norm_eps"])

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        att: SelfAttention = getattr(self, "self")
        b, s, h = x.shape
        d = h // att.heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, s, att.heads, d).transpose(0, 2, 1, 3)

        q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
        ctx = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d), mask=mask)
        return self.output(ctx.transpose(0, 2, 1, 3).reshape(b, s, h), x)


class Intermediate(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c["intermediate_size"], c["hidden_size"], c["layer_norm_eps"])

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = [Layer(c) for _ in range(c["num_hidden_layers"])]


class Pooler(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["hidden_size"])


class Bert(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.pooler = Pooler(c)


class BertForSequenceClassification(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.bert = Bert(c)
        self.classifier = nn.Linear(c["hidden_size"], num_labels(c))

    def __call__(self, ids: mx.array, mask: mx.array, types: mx.array) -> mx.array:
        x = self.bert.embeddings(ids, types)
        # additive mask: 0 for real tokens, a large negative for padding
        add = ((1 - mask.astype(x.dtype)) * -1e4 if x.dtype != mx.float32 else (1 - mask.astype(x.dtype)) * -1e9)
        add = add[:, None, None, :]
        for layer in self.bert.encoder.layer:
            x = layer(x, add)
        pooled = mx.tanh(self.bert.pooler.dense(x[:, 0]))
        return self.classifier(pooled)


def load_mlx_model(model_dir: str, precision: str) -> BertForSequenceClassification:
    c = json.loads((Path(model_dir) / "config.json").read_text())
    if c.get("model_type") != "bert":
        from xbench.errors import BackendUnavailable

        raise BackendUnavailable(f"backend 'mlx' implements BERT only; {model_dir} is a {c.get('model_type')!r} model")
    model = BertForSequenceClassification(c)
    weights = mx.load(str(Path(model_dir) / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    model.load_weights(list(weights.items()), strict=True)
    model.set_dtype(DTYPES[precision])
    if precision in QUANT_BITS:
        # Group size 64 (MLX's default) where the input width allows it, else 32.
        group = 64 if c["hidden_size"] % 64 == 0 and c["intermediate_size"] % 64 == 0 else 32
        nn.quantize(model, group_size=group, bits=QUANT_BITS[precision],
                    class_predicate=lambda path, m: isinstance(m, nn.Linear) and ".encoder." in f".{path}."
                    and m.weight.shape[-1] % group == 0)
    mx.eval(model.parameters())
    return model


class MlxBackend:
    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False):
        self.precision = precision
        self.threads = threads
        if device != "mps":
            _say_slow_once()
        mx.set_default_device(mx.gpu if device == "mps" else mx.cpu)
        self.model = load_mlx_model(model_dir, precision)
        self._fn = mx.compile(self.model)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        logits = self._fn(mx.array(input_ids.astype(np.int32)), mx.array(attention_mask.astype(np.int32)),
                          mx.array(token_type_ids.astype(np.int32)))
        return relevance(np.array(logits.astype(mx.float32)))

    def close(self) -> None:
        """Finish MLX's queued work on this worker's thread, so no MLX thread outlives the
        interpreter (which aborted the process at exit: "terminate called without an active
        exception")."""
        mx.synchronize()
        del self._fn, self.model
        mx.clear_cache()

    def describe(self) -> dict[str, Any]:
        return {"engine": "mlx", "mlx": mx.__version__ if hasattr(mx, "__version__") else None,
                "device": str(mx.default_device()), "precision": self.precision,
                "computed": MIXED.get(self.precision, self.precision),
                "threads": "mlx manages its own CPU threads"}
