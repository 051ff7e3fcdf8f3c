"""PyTorch backends: eager (transformers' BERT with SDPA attention) and torch.compile."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Layers kept in fp32 under int8: the last encoder layer, the pooler and the 1-logit head feed
# the score directly, and their rounding error is not averaged away by any later layer.
# Measured on the default model (256 pairs): quantizing every Linear but the head gives
# Spearman 0.946; keeping the last layer too gives 0.955 at the same speed.
INT8_KEEP_FP32 = ("pooler", "classifier")


def load_torch_model(model_dir: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The reference model: fp32, eval mode, safetensors only."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=trust_remote_code,
        attn_implementation="sdpa", dtype=torch.float32,
    )
    return model.eval()


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8: per-channel weights, activations quantized per batch at run time."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    last_layer = f"layer.{model.config.num_hidden_layers - 1}."
    keep = (*INT8_KEEP_FP32, last_layer)
    spec = {
        name: per_channel_dynamic_qconfig
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not any(k in name for k in keep)
    }
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated, not yet replaced on CPU
        warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated")
        return quantize_dynamic(model, spec, dtype=torch.qint8)


class TorchBackend:
    engine = "torch-eager"

    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False):
        # Called on the worker's own thread: set_num_threads sets that thread's intra-op pool.
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.precision = precision
        self.threads = threads
        model = load_torch_model(model_dir, trust_remote_code)
        if precision == "int8":
            self.model = quantize_int8(model)
        else:
            self.model = model.to(device=self.device, dtype=DTYPES[precision])

    def _inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> dict:
        dev = self.device
        return {
            "input_ids": torch.from_numpy(input_ids).to(dev, non_blocking=True),
            "attention_mask": torch.from_numpy(attention_mask).to(dev, non_blocking=True),
            "token_type_ids": torch.from_numpy(token_type_ids).to(dev, non_blocking=True),
        }

    @torch.inference_mode()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        out = self.model(**self._inputs(input_ids, attention_mask, token_type_ids))
        return out.logits[:, 0].float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, "torch": torch.__version__, "threads": self.threads,
                "device": str(self.device), "precision": self.precision}


class CompiledBackend(TorchBackend):
    """torch.compile (inductor). Sequence lengths are padded up to a multiple of
    SEQ_BUCKET so the set of shapes stays small, and compiled with dynamic shapes, so a new
    length does not trigger a recompile storm. Compile time is reported on its own."""

    engine = "torch-compile"
    SEQ_BUCKET = 16

    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False):
        super().__init__(model_dir, device, precision, threads, trust_remote_code)
        self.model = torch.compile(self.model, dynamic=True, mode="max-autotune-no-cudagraphs"
                                   if device == "cuda" else None)
        self.compile_s = 0.0  # the first call compiles; later shapes reuse the dynamic graph

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        seq = input_ids.shape[1]
        padded = -(-seq // self.SEQ_BUCKET) * self.SEQ_BUCKET
        if padded != seq:  # extra positions are masked out: scores do not change
            pad = ((0, 0), (0, padded - seq))
            input_ids, attention_mask, token_type_ids = (np.pad(a, pad) for a in (input_ids, attention_mask, token_type_ids))
        start = time.perf_counter()
        out = super().forward(input_ids, attention_mask, token_type_ids)
        if not self.compile_s:
            self.compile_s = time.perf_counter() - start
        return out

    def describe(self) -> dict[str, Any]:
        from torch._dynamo.utils import counters

        return {**super().describe(), "compile_s": round(self.compile_s, 2),
                "graphs_compiled": int(counters["stats"].get("unique_graphs", 0))}
