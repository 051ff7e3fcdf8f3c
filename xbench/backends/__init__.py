"""Backends behind one protocol; see base.py. Registered here, imported only when chosen."""

from xbench.backends.base import (
    PRECISIONS,
    REGISTRY,
    Backend,
    BackendSpec,
    available_devices,
    check_instance,
    create_backend,
    normalize,
    register,
)

register(BackendSpec(
    name="pytorch",
    target="xbench.backends.torch_backend:TorchBackend",
    precisions=("fp32", "fp16", "bf16"),
    devices=("cpu", "cuda", "mps"),
    requires=("torch", "transformers"),
    summary="PyTorch eager (SDPA attention)",
))

__all__ = [
    "PRECISIONS", "REGISTRY", "Backend", "BackendSpec", "available_devices", "check_instance",
    "create_backend", "normalize", "register",
]
