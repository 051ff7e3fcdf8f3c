"""CTranslate2 backend: the encoder in CTranslate2, the classification head in numpy.

CTranslate2 converts the base encoder only (BERT, RoBERTa/XLM-RoBERTa, DistilBERT), so the
sequence-classification head is read from the checkpoint and applied here to what the head
reads in transformers: BERT's pooled output, or the first token's hidden state. The conversion
runs once per model (float32, cached by the weights' content like the ONNX export); precisions
are CTranslate2 compute types chosen at load time. CTranslate2 removes padding before its
dense layers on the CPU (and on CUDA except in float16), so its batches cost their real tokens.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from xbench.backends.base import MIXED, relevance
from xbench.errors import BackendUnavailable
from xbench.checkpoints import cache_dir, weights_key

log = logging.getLogger(__name__)
COMPUTE_TYPES = {"fp32": "float32", "int8": "int8_float32", "fp16": "float16", "bf16": "bfloat16"}
CUDA_COMPUTE_TYPES = {**COMPUTE_TYPES, "int8": "int8_float16"}
RECIPE = "ct2-1"


def converted_path(model_dir: Path) -> Path:
    return cache_dir() / "ctranslate2" / f"{model_dir.name}-{weights_key(model_dir)}-{RECIPE}"


def ensure_converted(model_dir: Path) -> Path:
    """The cached float32 conversion of the model's encoder (converted now if missing)."""
    out = converted_path(model_dir)
    if (out / "model.bin").is_file():
        return out
    from ctranslate2.converters import TransformersConverter

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        TransformersConverter(str(_converter_view(model_dir, tmp / "source"))).convert(str(tmp / "model"), force=True)
        shutil.rmtree(out, ignore_errors=True)
        (tmp / "model").rename(out)
    except (ValueError, KeyError, NotImplementedError, AssertionError) as exc:
        raise BackendUnavailable(f"backend 'ctranslate2' cannot convert {model_dir.name}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _converter_view(model_dir: Path, view: Path) -> Path:
    """The model folder as the converter expects it: its files linked, and config.json stating
    `position_embedding_type`, which the converter asserts and transformers 5 no longer writes."""
    import json

    view.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config.setdefault("position_embedding_type", "absolute")
    (view / "config.json").write_text(json.dumps(config))
    return view


class Head:
    """The checkpoint's classification head, in numpy, by architecture."""

    def __init__(self, model_dir: Path):
        import json

        from safetensors import safe_open

        self.kind = json.loads((model_dir / "config.json").read_text())["model_type"]
        names = {"bert": ["classifier"], "distilbert": ["pre_classifier", "classifier"],
                 "roberta": ["classifier.dense", "classifier.out_proj"],
                 "xlm-roberta": ["classifier.dense", "classifier.out_proj"]}.get(self.kind)
        if names is None:
            raise BackendUnavailable(f"backend 'ctranslate2' does not run {self.kind!r} models here; "
                                     "it runs bert, roberta, xlm-roberta and distilbert")
        with safe_open(str(model_dir / "model.safetensors"), framework="numpy") as f:
            keys = set(f.keys())
            self.layers = [(f.get_tensor(f"{n}.weight").astype(np.float32).T, f.get_tensor(f"{n}.bias").astype(np.float32))
                           for n in (self._prefixed(n, keys) for n in names)]

    @staticmethod
    def _prefixed(name: str, keys: set[str]) -> str:
        return name if f"{name}.weight" in keys else next(k[: -len(".weight")] for k in keys if k.endswith(f"{name}.weight"))

    @property
    def reads_pooled(self) -> bool:
        return self.kind == "bert"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "distilbert":
            (w1, b1), (w2, b2) = self.layers
            return np.maximum(x @ w1 + b1, 0) @ w2 + b2
        if self.kind == "bert":
            ((w, b),) = self.layers
            return x @ w + b
        (w1, b1), (w2, b2) = self.layers  # RoBERTa: dense, tanh, out_proj on the first token
        return np.tanh(x @ w1 + b1) @ w2 + b2


class CTranslate2Backend:
    engine = "ctranslate2"

    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False):
        import ctranslate2

        self.device, self.precision, self.threads = device, precision, threads
        path = Path(model_dir)
        self.head = Head(path)
        self.path = ensure_converted(path)
        self.compute_type = (CUDA_COMPUTE_TYPES if device == "cuda" else COMPUTE_TYPES)[precision]
        self.encoder = ctranslate2.Encoder(str(self.path), device=device, compute_type=self.compute_type,
                                           intra_threads=threads, inter_threads=1)
        self.uses_token_types = self.head.kind != "distilbert"
        # CTranslate2 drops padding before its dense layers (except in float16 on CUDA) and pads
        # again for attention.
        self.packed = not (device == "cuda" and precision == "fp16")
        self.varlen_attention = False

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        import ctranslate2

        ids = ctranslate2.StorageView.from_array(np.ascontiguousarray(input_ids, dtype=np.int32))
        lengths = ctranslate2.StorageView.from_array(attention_mask.sum(1).astype(np.int32))
        types = token_type_ids.tolist() if self.uses_token_types else None
        out = self.encoder.forward_batch(ids, lengths, token_type_ids=types)
        if self.head.reads_pooled:
            features = self._numpy(out.pooler_output)
        else:
            features = self._numpy(out.last_hidden_state)[:, 0]
        return relevance(self.head(features))

    def _numpy(self, view: Any) -> np.ndarray:
        if self.device == "cuda":
            import torch

            return torch.as_tensor(view, device="cuda").float().cpu().numpy()
        return np.asarray(view, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        import ctranslate2

        return {"engine": self.engine, "ctranslate2": ctranslate2.__version__, "threads": self.threads,
                "device": self.device, "precision": self.precision, "compute_type": self.compute_type,
                "computed": MIXED.get(self.precision, self.precision),
                "packed": self.packed, "converted": str(self.path)}
