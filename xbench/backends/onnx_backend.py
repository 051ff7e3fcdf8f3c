"""ONNX Runtime backend. The model is exported once and cached on disk, keyed by the
content of its weights and config, the precision, the opset and the graph recipe; a cached file
that fails to load is rebuilt.

fp32: exported with eager attention, then fused by ONNX Runtime's transformer optimizer
(EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu) where the architecture
matches BERT's patterns; other architectures keep the plain graph. int8: dynamic quantization
(per-channel weights, activations per batch) of the MatMuls and fused Attention, pooler and head
kept in fp32. int4: weight-only MatMulNBits (block 32). fp16: the fused graph converted, on the
CUDA provider only (CPU kernels for fp16 are scarce).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from xbench.backends.base import MIXED, relevance
from xbench.checkpoints import cache_dir, weights_key

log = logging.getLogger(__name__)
T = TypeVar("T")
OPSET = 17
# Bumped whenever the export or fusion recipe changes, so old cached graphs are not reused.
RECIPE = "fused1"
# Weights past this size go to a side file `<name>.data`: protobuf caps one file at 2 GiB, and
# large rerankers (e.g. XLM-R large, 2.2 GB in fp32) pass it.
EXTERNAL_DATA_BYTES = 1 << 30
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu", "QAttention")


def onnx_path(model_dir: Path, precision: str) -> Path:
    folder = f"{model_dir.name}-{weights_key(model_dir)}"
    return cache_dir() / "onnx" / folder / f"model-{precision}-opset{OPSET}-{RECIPE}.onnx"


def _external_data(model_dir: Path) -> bool:
    weights = model_dir / "model.safetensors"
    return weights.is_file() and weights.stat().st_size > EXTERNAL_DATA_BYTES


def _export_fp32(model_dir: Path, out: Path, tmp: Path) -> None:
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from xbench.backends.torch_backend import accepted_inputs, load_torch_model

    # Eager attention, not SDPA: its MatMul/Softmax pattern is what ORT's fusion recognizes.
    model = load_torch_model(str(model_dir), attention="eager")
    names = accepted_inputs(model)
    raw = tmp / "raw.onnx"
    # Token type 0 exists in every model (XLM-R has only that one); ids of 1 are in every vocabulary.
    dummy = {name: (torch.zeros if name == "token_type_ids" else torch.ones)((2, 16), dtype=torch.int64)
             for name in names}
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["logits"] = {0: "batch"}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on data-dependent Python branches: shapes stay dynamic
        torch.onnx.export(model, (), str(raw), kwargs=dummy, input_names=list(names), output_names=["logits"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    cfg = model.config
    fused = optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                           hidden_size=cfg.hidden_size, opt_level=1)
    fused.save_model_to_file(str(out), use_external_data_format=_external_data(model_dir))


def _head_nodes(graph) -> list[str]:
    """Nodes of the pooler and the 1-logit head: kept in fp32 by every quantizer (their rounding
    error reaches the score directly)."""
    return [n.name for n in graph.graph.node if "pooler" in n.name or "classifier" in n.name]


def _build(model_dir: Path, precision: str, out: Path) -> None:
    """Write the ONNX file of `precision` to `out` (atomically, via a temp folder), with its
    weights in `out.name + ".data"` beside it when the model is large."""
    import onnx

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    external = _external_data(model_dir)
    try:
        built = tmp / out.name  # same name: a side file's recorded location stays valid
        if precision == "fp32":
            _export_fp32(model_dir, built, tmp)
        else:
            fp32 = ensure_onnx(model_dir, "fp32")
            graph = onnx.load(str(fp32))
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(fp32), str(built), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm", "Attention"], nodes_to_exclude=_head_nodes(graph),
                             # fused contrib ops have no shape inference: their outputs are fp32
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                             use_external_data_format=external)
        elif precision == "int4":
            from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

            quant = MatMulNBitsQuantizer(graph, block_size=32, is_symmetric=True, nodes_to_exclude=_head_nodes(graph),
                                         algo_config=DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True))
            quant.process()
            quant.model.save_model_to_file(str(built), use_external_data_format=external)
        elif precision == "fp16":
            from onnxruntime.transformers.onnx_model import OnnxModel

            model = OnnxModel(graph)
            model.convert_float_to_float16(keep_io_types=True)
            model.save_model_to_file(str(built), use_external_data_format=external)
        elif precision != "fp32":
            raise ValueError(precision)
        for side in tmp.glob(f"{out.name}?*"):  # weights first, the graph that names them last
            os.replace(side, out.parent / side.name)
        os.replace(built, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def open_onnx(model_dir: Path, precision: str, open_file: Callable[[Path], T]) -> tuple[Path, T]:
    """The cached ONNX file for this model and precision, opened with `open_file`: built if
    missing, rebuilt if the cached file fails to open (a corrupt or partial file is never used)."""
    path = onnx_path(Path(model_dir), precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        try:
            return path, open_file(path)
        except Exception as exc:
            log.warning("cached ONNX file %s is unusable (%s); rebuilding it", path, exc)
        for stale in path.parent.glob(f"{path.name}*"):
            stale.unlink()
    _build(Path(model_dir), precision, path)
    return path, open_file(path)


def ensure_onnx(model_dir: Path, precision: str) -> Path:
    """The cached ONNX file, checked by opening it on the CPU (fp16 graphs, which run on CUDA
    only, just by being there)."""
    return open_onnx(model_dir, precision, _cpu_session if precision != "fp16" else Path.is_file)[0]


class OnnxBackend:
    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False):
        import onnxruntime as ort

        self.precision = precision
        self.threads = threads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        # The session itself proves the cached file usable: no separate check session.
        self.path, self.session = open_onnx(Path(model_dir), precision,
                                            lambda path: ort.InferenceSession(str(path), opts, providers=providers))
        self.providers = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            from xbench.errors import BackendUnavailable

            raise BackendUnavailable("backend 'onnx' on cuda needs onnxruntime-gpu (pip install onnxruntime-gpu)")
        self._names = {i.name for i in self.session.get_inputs()}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        (logits,) = self.session.run(["logits"], {k: v for k, v in feeds.items() if k in self._names})
        return relevance(logits)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"engine": "onnxruntime", "onnxruntime": ort.__version__, "threads": self.threads,
                "providers": self.providers, "precision": self.precision,
                "computed": MIXED.get(self.precision, self.precision), "onnx_file": str(self.path),
                "fused_ops": self.fused_ops}

    @cached_property
    def fused_ops(self) -> dict[str, int]:  # read from the file when first described, not at start-up
        return fused_op_counts(self.path)


def fused_op_counts(path: Path) -> dict[str, int]:
    """How many of ORT's fused transformer ops the cached graph holds (empty: unfused)."""
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: ops[op] for op in FUSED_OPS if ops[op]}
