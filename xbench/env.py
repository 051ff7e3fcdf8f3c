"""Facts of the machine a measurement ran on: CPU, usable cores, matrix extensions, GPU and the
versions of what computes. One home for them, read by result files, the cost-model cache key,
the model pool's thread split and `xbench backends`.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from functools import lru_cache
from pathlib import Path
from typing import Any

# CPU extensions that decide the low-precision fast paths (x86 and Arm names).
MATRIX_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                   "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve")
VERSIONED = ("torch", "transformers", "tokenizers", "onnxruntime", "ctranslate2", "mlx", "numpy")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The matrix-relevant extensions this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in MATRIX_FEATURES if f in flags]


# For each low precision, the CPU flags whose instructions compute it directly (any one will do).
NATIVE_PRECISION = {
    "bf16": ("avx512_bf16", "amx_bf16", "bf16"),
    "fp16": ("avx512_fp16", "amx_fp16", "asimdhp"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"),
}
EMULATED = {"bf16": "converted to fp32 in software (slower than fp32)",
            "fp16": "converted to fp32 in software (slower than fp32)",
            "int8": "8-bit multiply-adds in three AVX2/AVX-512 steps, no VNNI (a smaller gain)"}


def native_flags(precision: str) -> list[str]:
    """The flags of this CPU that compute `precision` directly (empty: emulated; fp32 is always native)."""
    return [f for f in cpu_features() if f in NATIVE_PRECISION.get(precision, ())]


def cpu_precisions() -> dict[str, str]:
    """Per precision on this CPU: 'native (flags)' or how it is emulated."""
    out = {"fp32": "native"}
    for precision in NATIVE_PRECISION:
        have = native_flags(precision)
        out[precision] = f"native ({', '.join(have)})" if have else EMULATED[precision]
    return out


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def accelerators() -> list[str]:
    """Devices torch can run on here, besides the CPU: cuda, mps."""
    found = []
    try:
        import torch

        if torch.cuda.is_available():
            found.append("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            found.append("mps")
    except ImportError:
        pass
    return found


def gpu_name() -> str | None:
    present = accelerators()
    if "cuda" in present:
        import torch

        return torch.cuda.get_device_name(0)
    return "Apple MPS" if "mps" in present else None


# Distributions that install a module under another name (ONNX Runtime's CUDA build).
DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


def _version(module: str) -> str | None:
    """The installed version, from the package's metadata: importing torch, transformers, ONNX
    Runtime, CTranslate2 and MLX only to read their versions took 3 s of every start. A module
    already imported (torch, for the accelerators) says it itself: PyPI's CUDA build of torch is
    "2.11.0" in its metadata but "2.11.0+cu130" in its own string, which names the build."""
    if own := getattr(sys.modules.get(module), "__version__", None):
        return own
    for dist in DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """CPU, cores, matrix extensions, GPU, OS, Python and library versions."""
    return {
        "host": platform.node(),
        "cpu": cpu_name(),
        "cores": usable_cores(),
        "cpu_features": cpu_features(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_name(),
        **{m: _version(m) for m in VERSIONED},
    }
