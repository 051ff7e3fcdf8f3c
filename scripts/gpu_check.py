"""GPU check: fidelity of the CUDA paths against the PyTorch fp32 reference, on the default model.

Scores the same 256 long-tailed pairs with each CUDA path (packed and padded PyTorch, compiled,
ONNX, CTranslate2) and compares them to transformers' padded fp32 forward on the CPU (same
weights). Prints a table with each path's raw forward rate at batch 128 (the ceiling the
pipeline is held to); writes results/gpu/fidelity.json. Run by scripts/gpu_check.sh, which then
measures pipeline-bench at batch 128, concurrency 16 on both workloads.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from xbench.backends import create_backend
from xbench.config import ModelInstanceConfig
from scipy.stats import spearmanr

from xbench.core.batcher import padded_batches
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.models import resolve_model
from xbench.results.store import environment, write_json
from xbench.workload import synthetic

# (backend, precision, packed): packed=None is the backend's default
PATHS = [("pytorch", "fp32", None), ("pytorch", "fp16", None), ("pytorch", "fp16", False), ("pytorch", "bf16", None),
         ("compiled", "fp16", None), ("compiled", "bf16", None), ("onnx", "fp32", None), ("onnx", "fp16", None),
         ("ctranslate2", "fp16", None), ("ctranslate2", "int8", None)]


def main() -> None:
    console = Console(width=140)
    model = resolve_model("xbench/minilm-l6-seeded")
    tok = TokenizerPool(load_tokenizer(model.path, 512))
    enc = tok.encode(synthetic(4096, seed=0, lengths="longtail").pairs(256))
    tok.close()
    batches = padded_batches(enc, 128)

    def run(backend: str, precision: str, device: str, packed: bool | None = None) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        inst = ModelInstanceConfig(backend=backend, device=device, quantization=precision, packed=packed)
        b = create_backend(inst, str(model.path), 4)
        out = np.empty(256, dtype=np.float32)
        for idx, arrays in batches:  # first pass: load, compile, warm up
            out[idx] = b.forward(*arrays)
        ready = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(5):
            for idx, arrays in batches:
                out[idx] = b.forward(*arrays)
        return out, 5 * 256 / (time.perf_counter() - t1), ready

    ref, ref_speed, _ = run("pytorch", "fp32", "cpu", packed=False)
    table = Table(title=f"CUDA paths vs PyTorch fp32 on CPU, default model, 256 pairs ({torch.cuda.get_device_name(0)})")
    for col in ("path", "max |Δ logit|", "Spearman", "forward pairs/s (batch 128)", "ready (load+compile) s"):
        table.add_column(col)
    rows = []
    for backend, precision, packed in PATHS:
        label = f"{backend} {precision}" + (" padded" if packed is False else "")
        try:
            got, speed, ready = run(backend, precision, "cuda", packed)
        except Exception as exc:  # e.g. onnxruntime without the CUDA provider
            rows.append({"path": label, "error": str(exc)[:200]})
            table.add_row(label, "unavailable", str(exc)[:60], "", "")
            continue
        diff, rho = float(np.abs(got - ref).max()), float(spearmanr(got, ref).statistic)
        rows.append({"path": label, "max_abs_diff": diff, "spearman": rho, "pairs_per_s": speed, "ready_s": ready})
        table.add_row(label, f"{diff:.1e}", f"{rho:.4f}", f"{speed:,.0f}", f"{ready:.1f}")
    console.print(table)
    write_json("results/gpu/fidelity.json", {"env": environment(), "reference_cpu_pairs_per_s": ref_speed, "paths": rows})


if __name__ == "__main__":
    main()
