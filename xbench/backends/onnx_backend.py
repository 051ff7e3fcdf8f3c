"""ONNX Runtime backend. The model is exported once and cached on disk, keyed by the
model's weights, the precision and the opset; a cached file that fails to load is rebuilt.

fp32: the plain export. int8: dynamic quantization (per-channel weights, activations per
batch) of the MatMuls, pooler and head kept in fp32. int4: weight-only MatMulNBits (block
32). fp16: converted graph, on the CUDA provider only (CPU kernels for fp16 are scarce).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from xbench.models import cache_dir

log = logging.getLogger(__name__)
OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _weights_key(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        p = model_dir / name
        if p.is_file():
            st = p.stat()
            h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(str(model_dir.resolve()).encode())
    return h.hexdigest()[:16]


def onnx_path(model_dir: Path, precision: str) -> Path:
    return cache_dir() / "onnx" / f"{model_dir.name}-{_weights_key(model_dir)}" / f"model-{precision}-opset{OPSET}.onnx"


def _export_fp32(model_dir: Path, out: Path) -> None:
    import torch

    from xbench.backends.torch_backend import load_torch_model

    model = load_torch_model(str(model_dir))
    dummy = tuple(torch.ones((2, 16), dtype=torch.int64) for _ in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["logits"] = {0: "batch"}
    with torch.inference_mode():
        torch.onnx.export(model, dummy, str(out), input_names=list(INPUTS), output_names=["logits"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _build(model_dir: Path, precision: str, out: Path) -> None:
    """Write the ONNX file of `precision` to `out` (atomically, via a temp folder)."""
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        fp32 = ensure_onnx(model_dir, "fp32") if precision != "fp32" else tmp / "fp32.onnx"
        if precision == "fp32":
            _export_fp32(model_dir, fp32)
            built = fp32
        elif precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            built = tmp / "int8.onnx"
            import onnx

            graph = onnx.load(str(fp32))
            keep = [n.name for n in graph.graph.node if "pooler" in n.name or "classifier" in n.name]
            quantize_dynamic(str(fp32), str(built), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep)
        elif precision == "int4":
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

            graph = onnx.load(str(fp32))
            keep = [n.name for n in graph.graph.node if "pooler" in n.name or "classifier" in n.name]
            quant = MatMulNBitsQuantizer(graph, block_size=32, is_symmetric=True, nodes_to_exclude=keep,
                                         algo_config=DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True))
            quant.process()
            built = tmp / "int4.onnx"
            quant.model.save_model_to_file(str(built), use_external_data_format=False)
        elif precision == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            built = tmp / "fp16.onnx"
            onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(built))
        else:
            raise ValueError(precision)
        os.replace(built, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _loads(path: Path) -> bool:
    try:
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return True
    except Exception as exc:
        log.warning("cached ONNX file %s is unusable (%s); rebuilding it", path, exc)
        return False


def ensure_onnx(model_dir: Path, precision: str) -> Path:
    """The cached ONNX file for this model and precision, built (or rebuilt) if needed."""
    path = onnx_path(Path(model_dir), precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and (precision == "fp16" or _loads(path)):
        return path
    path.unlink(missing_ok=True)
    _build(Path(model_dir), precision, path)
    return path


class OnnxBackend:
    def __init__(self, model_dir: str, device: str, precision: str, threads: int, trust_remote_code: bool = False):
        import onnxruntime as ort

        self.precision = precision
        self.threads = threads
        self.path = ensure_onnx(Path(model_dir), precision)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.providers = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            from xbench.errors import BackendUnavailable

            raise BackendUnavailable("backend 'onnx' on cuda needs onnxruntime-gpu (pip install onnxruntime-gpu)")
        self._names = {i.name for i in self.session.get_inputs()}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        (logits,) = self.session.run(["logits"], {k: v for k, v in feeds.items() if k in self._names})
        return np.asarray(logits, dtype=np.float32)[:, 0]

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"engine": "onnxruntime", "onnxruntime": ort.__version__, "threads": self.threads,
                "providers": self.providers, "precision": self.precision, "onnx_file": str(self.path)}
