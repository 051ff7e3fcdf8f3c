"""PyTorch backends: eager (transformers' BERT with SDPA attention) and torch.compile."""

from __future__ import annotations

import inspect
import time
import warnings
from typing import Any

import numpy as np
import torch

from xbench.backends.base import MIXED, relevance
from xbench.backends.decoder import LabelScorer, PackedDecoder, load_causal_lm
from xbench.backends.packed import (PackedEncoder, PackedModernBert, Packing, flash_varlen_available, pack_inputs,
                                    packed_classifier, packs)
from xbench.layout import unpad

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Layers kept in fp32 under int8 and int4: the last layer and every head feed the score directly,
# and their rounding error is not averaged away by any later layer. Measured on the default model
# (256 pairs): quantizing every Linear but the head gives Spearman 0.946; keeping the last layer
# too gives 0.955 at the same speed. Module names across families: BERT, RoBERTa, ELECTRA
# (`pooler`, `classifier`), ModernBERT (`head`, `classifier`), decoders (`score`, `lm_head`).
KEEP_FP32 = ("pooler", "classifier", "score", "head.", "lm_head")
INT4_GROUP = 32  # weights per int4 scale/zero pair, along the input dimension


def load_torch_model(model_dir: str, trust_remote_code: bool = False, attention: str = "sdpa") -> torch.nn.Module:
    """The reference model: fp32, eval mode, safetensors only."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def load(implementation: str) -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(
            model_dir, use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=implementation, dtype=torch.float32,
        )

    try:
        model = load(attention)
    except ValueError as exc:  # transformers 4 has no SDPA path for some architectures (ELECTRA)
        if attention != "sdpa" or "scaled_dot_product_attention" not in str(exc):
            raise
        model = load("eager")  # the packed model runs its own attention either way
    return model.eval()


def accepted_inputs(model: torch.nn.Module) -> tuple[str, ...]:
    """The tokenizer outputs this architecture's forward takes (DistilBERT, for one, takes no
    token_type_ids)."""
    params = inspect.signature(model.forward).parameters
    return tuple(name for name in ("input_ids", "attention_mask", "token_type_ids") if name in params)


def quantizable_linears(model: torch.nn.Module) -> list[str]:
    """Names of the Linear layers a quantizer may touch (all but KEEP_FP32 and the last layer,
    named `layer.N.` in BERT's family and `layers.N.` in ModernBERT's and the decoders')."""
    last = model.config.num_hidden_layers - 1
    keep = (*KEEP_FP32, f"layer.{last}.", f"layers.{last}.")
    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and not any(name.startswith(k) or f".{k}" in name for k in keep)]


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8: per-channel weights, activations quantized per batch at run time."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = dict.fromkeys(quantizable_linears(model), per_channel_dynamic_qconfig)
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated, not yet replaced on CPU
        warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated")
        return quantize_dynamic(model, spec, dtype=torch.qint8)


class Int4Linear(torch.nn.Module):
    """Weight-only int4 Linear on torch's CPU int4 kernel: asymmetric, one scale and zero per
    INT4_GROUP weights. The kernel is fast only for bf16 activations (fp32 ones take a scalar
    path, ~2 GFLOP/s here), so the matmul reads bf16 and the output returns to fp32."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-8) / 15
        q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # The kernel dequantizes as (q - 8) * scale + zero, so zero is the value of q = 8.
        zero = lo + 8 * scale
        scale_zero = torch.stack([scale[..., 0], zero[..., 0]], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zero", scale_zero.to(torch.bfloat16))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.out_features = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scale_zero)
        y = y.float().reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int4(model: torch.nn.Module) -> torch.nn.Module:
    """Swap each quantizable Linear (input width a multiple of INT4_GROUP) for an Int4Linear."""
    for name in quantizable_linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if linear.in_features % INT4_GROUP == 0:
            setattr(parent, child, Int4Linear(linear))
    return model


class TorchBackend:
    """Eager PyTorch. packed=True (the default where the architecture allows it) runs the dense
    layers on the real tokens only (backends/packed.py); False runs transformers' padded forward.
    With cuda_graphs=True (CUDA, fp16/bf16) the packed forward replays as CUDA graphs
    (backends/cuda_graphs.py)."""

    engine = "torch-eager"

    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False,
                 packed: bool | None = None, cuda_graphs: bool | None = None, label_ids: tuple[int, ...] | None = None,
                 shared_prefix: bool = True):
        # Called on the worker's own thread: set_num_threads sets that thread's intra-op pool.
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.precision = precision
        self.threads = threads
        self.decoder = bool(label_ids)
        if self.decoder:  # an LLM reranker: the label rows of its LM head at the last token (decoder.py)
            lm = load_causal_lm(model_dir, trust_remote_code)
            self.input_names: tuple[str, ...] = ("input_ids", "attention_mask")
            self.packed = PackedDecoder.supports(lm.config) if packed is None else packed
            model = (PackedDecoder if self.packed else LabelScorer)(lm, label_ids, shared_prefix)
        else:
            model = load_torch_model(model_dir, trust_remote_code)
            self.input_names = accepted_inputs(model)
            self.packed = packs(model, self.device) if packed is None else packed
            if self.packed:
                model = packed_classifier(model)  # raises, naming the architectures it runs, when it cannot
        self.varlen_attention = self.packed
        self.flat_input = self.packed  # a packed model takes flat batches as they leave the batcher
        # CUDA at fp16/bf16: flash attention's variable-length kernel, straight on the packed tokens
        # (PackedEncoder's layout; the decoder and ModernBERT choose per call in varlen_attention).
        self.flash_varlen = (isinstance(model, PackedEncoder)
                             and flash_varlen_available(self.device, DTYPES.get(precision, torch.float32)))
        # Attention straight on the packed tokens by each pair's offsets, no padded layout to work
        # out per batch: flash attention's kernel, or ModernBERT's one call per pair.
        self.attention_by_offsets = self.flash_varlen or isinstance(model, PackedModernBert)
        self._staging: torch.Tensor | None = None  # pinned host buffer the packed inputs reach the GPU through
        self._copied: torch.cuda.Event | None = None  # ... and when its last copy to the GPU is done
        if precision == "int8":
            self.model = quantize_int8(model)
        elif precision == "int4":
            self.model = quantize_int4(model)
        else:
            self.model = model.to(device=self.device, dtype=DTYPES[precision])
        # Each worker on its own CUDA stream: two workers on one GPU overlap their copies and
        # kernels instead of queueing on the default stream. The weights' copies finish first.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.stream is not None:
            torch.cuda.synchronize(self.device)
        self.graphed = None
        if cuda_graphs and not self.flash_varlen:
            raise ValueError(f"cuda_graphs=true needs packed execution on CUDA at fp16/bf16 with flash attention "
                             f"(device {device}, precision {precision}, packed {self.packed})")
        if cuda_graphs:
            from xbench.backends.cuda_graphs import GraphedEncoder

            self.graphed = GraphedEncoder(self.model, self.device, self.max_positions(model))

    @staticmethod
    def max_positions(model: torch.nn.Module) -> int:
        """The longest pair the position embeddings hold (RoBERTa's start past its padding id)."""
        return int(model.config.max_position_embeddings) - getattr(model, "position_offset", 0)

    def _inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> dict:
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return {name: torch.from_numpy(arrays[name]).to(self.device, non_blocking=True) for name in self.input_names}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        if self.packed:  # a padded batch from outside the pipeline (a test, a benchmark)
            return self.forward_packed(*unpad(input_ids, attention_mask, token_type_ids))
        with torch.inference_mode(), torch.cuda.stream(self.stream):  # the stream: a no-op off CUDA
            out = self.model(**self._inputs(input_ids, attention_mask, token_type_ids))
            logits = out if isinstance(out, torch.Tensor) else out.logits
            return relevance(logits.float().cpu().numpy())

    def forward_packed(self, flat_ids: np.ndarray, flat_types: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits of a flat batch (the model pool's way in): a packed model takes it as it is,
        with its layout worked out on the host, so no padded batch is built and taken apart
        again, and the GPU is not synchronised to learn where the real tokens are."""
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            if self.decoder:  # its own layout: the prefix tree, worked out on the host
                return relevance(self.model(self.model.tree(flat_ids, lengths)).float().cpu().numpy())
            if self.graphed is not None:
                return relevance(self.graphed.forward(flat_ids, flat_types, lengths).numpy())
            shape, inputs = pack_inputs(flat_ids, flat_types, lengths, self.model.position_offset)
            buffer = self._to_device(inputs)
            _, _, _, offsets, first = shape.views(buffer)
            if self.attention_by_offsets:
                packing = Packing.of_offsets(offsets, first, shape.longest)
            else:  # the CPU groups pairs of similar length for attention; CUDA makes one padded call
                packing = Packing.of_lengths(lengths, offsets, first, grouped=self.device.type == "cpu")
            return relevance(self.model(buffer, shape, packing).float().cpu().numpy())

    def _to_device(self, inputs: np.ndarray) -> torch.Tensor:
        """The packed inputs on the model's device: on CUDA one non-blocking copy from a pinned
        buffer that the worker reuses once the previous copy out of it is done (normally long
        since: the last forward ended by copying its scores back)."""
        if self.device.type != "cuda":
            return torch.from_numpy(inputs)
        if self._copied is not None:
            self._copied.synchronize()
        if self._staging is None or len(self._staging) < len(inputs):
            self._staging = torch.empty(2 * len(inputs), dtype=torch.int32).pin_memory()
        staging = self._staging[:len(inputs)]
        staging.copy_(torch.from_numpy(inputs))
        on_device = staging.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device

    def computed(self) -> str:
        """What the hardware computes: TF32 on CUDA, or oneDNN's reduced-precision fp32 matmuls on
        the CPU, when torch is set to allow them; int4's matmuls read bf16 activations."""
        if self.precision == "fp32":
            if self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
                return "tf32 matmuls, fp32 elsewhere"
            if torch.get_float32_matmul_precision() != "highest":
                return f"fp32 (matmul precision {torch.get_float32_matmul_precision()!r}: oneDNN may round to bf16)"
            return "fp32"
        if self.precision == "int4":
            return "int4 weights, bf16 matmul activations, fp32 elsewhere"
        return MIXED.get(self.precision, self.precision)

    def describe(self) -> dict[str, Any]:
        graphs = self.graphed.describe() if self.graphed is not None else {"cuda_graphs": False}
        shared = getattr(self.model, "shared_prefix", None)
        return {"engine": self.engine, "torch": torch.__version__, "threads": self.threads,
                "device": str(self.device), "precision": self.precision, "computed": self.computed(),
                "packed": self.packed, **graphs,
                **({"shared_prefix": shared} if shared is not None else {})}


class CompiledBackend(TorchBackend):
    """torch.compile (inductor) with dynamic shapes: one graph serves every batch size and
    sequence length, so no new shape triggers a recompile storm. Lengths are padded up to a
    multiple of SEQ_BUCKET, and a lone row is doubled, because dynamo specializes a dimension of
    size 1 and would compile a second graph for it (a 15-20 s stall on the first single-pair
    request). Compile time (the first call) is reported on its own."""

    engine = "torch-compile"
    SEQ_BUCKET = 16

    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False,
                 packed: bool | None = None):
        # Padded: one dynamic-shape graph; packing's data-dependent token counts would recompile.
        super().__init__(model_dir, device, precision, threads, trust_remote_code, packed=False, cuda_graphs=False)
        self.model = torch.compile(self.model, dynamic=True, mode="max-autotune-no-cudagraphs"
                                   if device == "cuda" else None)
        self.compile_s = 0.0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        rows, seq = input_ids.shape
        padded = -(-seq // self.SEQ_BUCKET) * self.SEQ_BUCKET
        arrays = (input_ids, attention_mask, token_type_ids)
        if padded != seq:  # extra positions are masked out: scores do not change
            arrays = tuple(np.pad(a, ((0, 0), (0, padded - seq))) for a in arrays)
        if rows == 1:
            arrays = tuple(np.repeat(a, 2, axis=0) for a in arrays)
        start = time.perf_counter()
        out = super().forward(*arrays)
        if not self.compile_s:
            self.compile_s = time.perf_counter() - start
        return out[:rows]

    def describe(self) -> dict[str, Any]:
        from torch._dynamo.utils import counters

        return {**super().describe(), "compile_s": round(self.compile_s, 2),
                "graphs_compiled": int(counters["stats"].get("unique_graphs", 0))}
