"""The one Backend protocol every engine implements, and the registry that picks one.

A backend is imported only when chosen: the registry holds module paths and what each
backend supports, so `check_instance` can validate a config (and `xbench backends` can print
the matrix) without importing torch.compile, ONNX Runtime or MLX.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from xbench.errors import BackendUnavailable, ConfigError, missing_modules, require


class Backend(Protocol):
    """Runs one model on one device at one precision. One instance per model worker.

    The batch layout a backend takes is its own declaration, read in one place (`takes_flat`,
    used by ModelBatch.forward): flat batches go to `forward_packed`, padded ones to `forward`.
    A backend may also have `close()`, called on the worker's thread at shutdown (MLX has one).
    """

    # Whether the dense layers run on the real tokens only (no compute spent on padding), and
    # whether attention costs each pair's own length squared rather than the batch's longest;
    # the batch planner's cost model and the padding-efficiency counters read them.
    packed: bool
    varlen_attention: bool
    # The layout it takes: True, flat batches (xbench/layout.py) through `forward_packed`.
    flat_input: bool

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """Logits of one padded batch as float32 [rows]."""
        ...

    def describe(self) -> dict[str, Any]:
        """What results and /info should record about this backend (versions, threads)."""
        ...


class FlatBackend(Backend, Protocol):
    def forward_packed(self, flat_ids: np.ndarray, flat_types: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits of one flat batch: the pairs' tokens back to back, `lengths` a pair."""
        ...


def takes_flat(backend: Any) -> bool:
    """The layout a backend declared (padded where it declared none)."""
    return bool(getattr(backend, "flat_input", False))


# What a precision computes where it is not all one type: results name this, not only the precision
# asked for, so "int8" or "int4" from two engines can be told apart.
MIXED = {"int8": "int8 matmuls, fp32 elsewhere", "int4": "int4 weights, fp32 activations"}


def relevance(logits: np.ndarray) -> np.ndarray:
    """One relevance logit per row, float32: a one-logit head as it is; a two-class head
    (not relevant, relevant) as the log-odds l1 - l0, whose sigmoid is softmax's P(relevant)."""
    logits = np.asarray(logits, dtype=np.float32)
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    requires: tuple[str, ...] = ()  # importable modules the backend needs
    extra: str | None = None  # pip extra that installs them
    summary: str = ""
    # precision -> the only devices it runs on (e.g. fp16 ONNX needs the CUDA provider)
    limits: tuple[tuple[str, tuple[str, ...]], ...] = ()
    packs: bool = False  # can run packed (unpadded) batches: takes `packed`
    graphs: bool = False  # can replay its CUDA forward as CUDA graphs: takes `cuda_graphs`
    reads_labels: bool = False  # can score LLM rerankers from label logits: takes `label_ids`
    # precision -> CPU flags of which one must be present (its instructions, not an emulation)
    cpu_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def supports(self, precision: str, device: str) -> bool:
        allowed = dict(self.limits).get(precision)
        return precision in self.precisions and device in self.devices and (allowed is None or device in allowed)

    def missing(self) -> list[str]:
        return missing_modules(self.requires)

    def install_hint(self, missing: list[str]) -> str:
        return f"pip install 'xbench[{self.extra}]'" if self.extra else f"pip install {' '.join(missing)}"

    def load_class(self) -> type:
        missing = self.missing()
        require(f"backend {self.name!r}", missing, self.install_hint(missing))
        module, cls = self.target.split(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as exc:  # installed but broken, e.g. mlx without its CPU library on Linux
            raise BackendUnavailable(f"backend {self.name!r} cannot be imported ({exc}): "
                                     f"{self.install_hint(list(self.requires))}") from None


PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")

REGISTRY: dict[str, BackendSpec] = {}

# `backend: cuda` / `backend: mps` in configs mean the pytorch backend on that device.
DEVICE_ALIASES = {"cuda": ("pytorch", "cuda"), "mps": ("pytorch", "mps")}


def register(spec: BackendSpec) -> None:
    REGISTRY[spec.name] = spec


def available_devices() -> list[str]:
    from xbench.env import accelerators

    return ["cpu", *accelerators()]


def normalize(backend: str, device: str) -> tuple[str, str]:
    if backend in DEVICE_ALIASES:
        alias_backend, alias_device = DEVICE_ALIASES[backend]
        return alias_backend, alias_device if device == "cpu" else device
    return backend, device


def check_instance(inst: Any, key: str = "model_pool.instances.0") -> None:
    """Raise ConfigError naming the key and the accepted values for a bad combination."""
    backend, device = normalize(inst.backend, inst.device)
    spec = REGISTRY.get(backend)
    if spec is None:
        names = sorted(REGISTRY) + sorted(DEVICE_ALIASES)
        raise ConfigError(f"{key}.backend={inst.backend!r} is not a backend; choose one of {', '.join(names)}")
    if inst.quantization not in PRECISIONS:
        raise ConfigError(f"{key}.quantization={inst.quantization!r} is not a precision; choose one of {', '.join(PRECISIONS)}")
    if inst.quantization not in spec.precisions:
        raise ConfigError(
            f"{key}.quantization={inst.quantization!r} is not supported by backend {backend!r}; "
            f"it supports {', '.join(spec.precisions)}"
        )
    if device not in spec.devices:
        raise ConfigError(
            f"{key}.device={device!r} is not a device of backend {backend!r}; it runs on {', '.join(spec.devices)}"
        )
    allowed = dict(spec.limits).get(inst.quantization)
    if allowed is not None and device not in allowed:
        raise ConfigError(
            f"{key}: backend {backend!r} runs {inst.quantization} only on {', '.join(allowed)}, not on {device!r}; "
            f"on {device} it supports {', '.join(p for p in spec.precisions if spec.supports(p, device))}"
        )
    needs = dict(spec.cpu_flags).get(inst.quantization)
    if needs and device == "cpu":
        from xbench.env import cpu_features, cpu_name

        if not set(needs) & set(cpu_features()):
            raise ConfigError(f"{key}.quantization={inst.quantization!r} on backend {backend!r} needs a CPU with "
                              f"{' or '.join(needs)}; this CPU ({cpu_name()}) has {', '.join(cpu_features()) or 'none of the matrix extensions'}")
    if getattr(inst, "packed", None) and not spec.packs:
        packing = ", ".join(n for n, s in REGISTRY.items() if s.packs)
        raise ConfigError(f"{key}.packed=true: backend {backend!r} runs padded batches only; packed execution is "
                          f"in {packing}")
    if getattr(inst, "cuda_graphs", None):
        if not spec.graphs:
            graphing = ", ".join(n for n, s in REGISTRY.items() if s.graphs)
            raise ConfigError(f"{key}.cuda_graphs=true: backend {backend!r} has no CUDA graph path; {graphing} has")
        if device != "cuda" or inst.quantization not in ("fp16", "bf16") or getattr(inst, "packed", None) is False:
            raise ConfigError(f"{key}.cuda_graphs=true needs device=cuda, quantization fp16 or bf16 and packed "
                              f"execution (got device={device!r}, quantization={inst.quantization!r}, "
                              f"packed={getattr(inst, 'packed', None)})")
    present = available_devices() if device in ("cuda", "mps") else ["cpu"]
    if device not in present:
        raise ConfigError(f"{key}.device={device!r} is not present on this machine; available: {', '.join(available_devices())}")


def check_recipe(inst: Any, recipe: Any, key: str = "model_pool.instances.0", config: dict | None = None) -> None:
    """Before anything loads: a backend that cannot run the model's recipe (on the model's
    config.json) is refused by name."""
    if recipe.is_classifier:
        return
    backend, _ = normalize(inst.backend, inst.device)
    if not REGISTRY[backend].reads_labels:
        able = ", ".join(n for n, s in REGISTRY.items() if s.reads_labels)
        raise ConfigError(f"{key}.backend={backend!r} runs cross-encoder classifiers only; the model's recipe "
                          f"{recipe.name} (an LLM reranker read at its label tokens) runs on {able}")
    from xbench.backends.decoder import PACKED_DECODERS, PackedDecoder

    config = config or {}
    if getattr(inst, "packed", None) and not PackedDecoder.supports(config):
        raise ConfigError(f"{key}.packed=true: packed execution runs the decoders {', '.join(PACKED_DECODERS)} "
                          f"(full attention); this {config.get('model_type', 'model')} runs padded "
                          f"(length-sorted, with its shared prefix)")


def create_backend(inst: Any, model_dir: str, threads: int, label_ids: tuple[int, ...] | None = None) -> Backend:
    """A backend for one worker; `label_ids` (an LLM reranker's label tokens) only where it reads them."""
    backend, device = normalize(inst.backend, inst.device)
    spec = REGISTRY[backend]
    cls = spec.load_class()
    options: dict[str, Any] = {"packed": getattr(inst, "packed", None)} if spec.packs else {}
    if label_ids:
        options["label_ids"] = tuple(label_ids)
        options["shared_prefix"] = getattr(inst, "shared_prefix", None) is not False
    if spec.graphs:
        options["cuda_graphs"] = getattr(inst, "cuda_graphs", None)
    return cls(model_dir=model_dir, device=device, precision=inst.quantization, threads=threads,
               trust_remote_code=bool(getattr(inst, "trust_remote_code", False)), **options)
