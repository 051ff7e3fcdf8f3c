"""GPU check: fidelity of the CUDA paths against the PyTorch fp32 reference, on the default model.

Scores the same 256 default-workload pairs with each CUDA path and compares them to PyTorch
fp32 on the CPU (same weights). Prints a table; writes results/gpu/fidelity.json.
Run by scripts/gpu_check.sh, which then measures pipeline-bench at batch 128, concurrency 16.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from xbench.backends import create_backend
from xbench.config import ModelInstanceConfig
from xbench.core.batcher import padded_batches
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.models import resolve_model
from xbench.results.store import environment, write_json
from xbench.workload import synthetic

PATHS = [("pytorch", "fp32"), ("pytorch", "fp16"), ("pytorch", "bf16"), ("compiled", "fp16"), ("compiled", "bf16"),
         ("onnx", "fp32"), ("onnx", "fp16")]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    console = Console(width=140)
    model = resolve_model("xbench/minilm-l6-seeded")
    tok = TokenizerPool(load_tokenizer(model.path, 512))
    enc = tok.encode(synthetic(4096, seed=0).pairs(256))
    tok.close()
    batches = padded_batches(enc, 128)

    def run(backend: str, precision: str, device: str) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        b = create_backend(ModelInstanceConfig(backend=backend, device=device, quantization=precision), str(model.path), 4)
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

    ref, ref_speed, _ = run("pytorch", "fp32", "cpu")
    table = Table(title=f"CUDA paths vs PyTorch fp32 on CPU, default model, 256 pairs ({torch.cuda.get_device_name(0)})")
    for col in ("path", "max |Δ logit|", "Spearman", "forward pairs/s (batch 128)", "ready (load+compile) s"):
        table.add_column(col)
    rows = []
    for backend, precision in PATHS:
        try:
            got, speed, ready = run(backend, precision, "cuda")
        except Exception as exc:  # e.g. onnxruntime without the CUDA provider
            rows.append({"path": f"{backend}:{precision}", "error": str(exc)[:200]})
            table.add_row(f"{backend} {precision}", "unavailable", str(exc)[:60], "", "")
            continue
        diff, rho = float(np.abs(got - ref).max()), spearman(got, ref)
        rows.append({"path": f"{backend}:{precision}", "max_abs_diff": diff, "spearman": rho, "pairs_per_s": speed, "ready_s": ready})
        table.add_row(f"{backend} {precision}", f"{diff:.1e}", f"{rho:.4f}", f"{speed:,.0f}", f"{ready:.1f}")
    console.print(table)
    write_json("results/gpu/fidelity.json", {"env": environment(), "reference_cpu_pairs_per_s": ref_speed, "paths": rows})


if __name__ == "__main__":
    main()
