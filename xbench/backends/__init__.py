"""Backends behind one protocol; see base.py. Registered here, imported only when chosen."""

from xbench.backends.base import (
    PRECISIONS,
    REGISTRY,
    Backend,
    BackendSpec,
    available_devices,
    check_instance,
    check_recipe,
    create_backend,
    normalize,
    register,
)

register(BackendSpec(
    name="pytorch",
    target="xbench.backends.torch_backend:TorchBackend",
    precisions=("fp32", "fp16", "bf16", "int8", "int4"),
    devices=("cpu", "cuda", "mps"),
    requires=("torch", "transformers"),
    summary="PyTorch eager, packed (dense layers on real tokens only), SDPA attention; int8 = dynamic, "
            "per-channel weights; int4 = weight-only, groups of 32 (CPU); CUDA graphs at fp16/bf16 on CUDA",
    limits=(("int8", ("cpu",)), ("int4", ("cpu",))),
    packs=True,
    graphs=True,
    reads_labels=True,
))
register(BackendSpec(
    name="compiled",
    target="xbench.backends.torch_backend:CompiledBackend",
    precisions=("fp32", "bf16", "fp16"),
    devices=("cpu", "cuda"),
    requires=("torch", "transformers"),
    summary="torch.compile (inductor), one dynamic-shape graph, lengths padded to multiples of 16",
    limits=(("fp16", ("cuda",)),),
))
register(BackendSpec(
    name="onnx",
    target="xbench.backends.onnx_backend:OnnxBackend",
    precisions=("fp32", "fp16", "int8", "int4"),
    devices=("cpu", "cuda"),
    requires=("onnxruntime", "onnx"),
    extra="onnx",
    summary="ONNX Runtime; cached, fused export; int8 dynamic per-channel (CPU), int4 MatMulNBits; fp16 on CUDA",
    limits=(("fp16", ("cuda",)), ("int8", ("cpu",))),
))
register(BackendSpec(
    name="mlx",
    target="xbench.backends.mlx_backend:MlxBackend",
    precisions=("fp32", "fp16", "bf16", "int8", "int4"),
    devices=("cpu", "mps"),  # mps: Apple's GPU, as torch names it
    requires=("mlx",),
    extra="mlx",
    summary="BERT in MLX from safetensors; Apple GPU, or mlx\\[cpu] on Linux",
))
register(BackendSpec(
    name="openvino",
    target="xbench.backends.openvino_backend:OpenVinoBackend",
    precisions=("fp32", "bf16", "int8"),
    devices=("cpu",),
    requires=("openvino", "nncf"),
    extra="openvino",
    summary="OpenVINO CPU plugin on an IR converted once and cached; precision pinned (fp32 is f32, not the "
            "plugin's bf16 default); int8 = NNCF static, calibrated on held-out synthetic pairs",
    cpu_flags=(("bf16", ("avx512_bf16", "amx_bf16")),),
))
register(BackendSpec(
    name="ctranslate2",
    target="xbench.backends.ct2_backend:CTranslate2Backend",
    precisions=("fp32", "int8", "fp16", "bf16"),
    devices=("cpu", "cuda"),
    requires=("ctranslate2",),
    extra="ctranslate2",
    summary="CTranslate2 encoder (drops padding itself) + the checkpoint's head in numpy; converted once, cached",
    limits=(("fp16", ("cuda",)), ("bf16", ("cuda",))),
))

__all__ = [
    "PRECISIONS", "REGISTRY", "Backend", "BackendSpec", "available_devices", "check_instance",
    "check_recipe", "create_backend", "normalize", "register",
]
