"""What this machine's matrix units deliver at each precision: the ceiling a backend's precision
can reach, since a cross-encoder's time goes mostly to GEMMs (three quarters of the eager
fp32 forward of the default model on CPU, by torch.profiler).

One GEMM of the default model's FFN shape, timed with the kernels the pytorch backend uses:
F.linear for fp32/bf16/fp16 (oneDNN/MKL), fbgemm's dynamic int8 Linear, and torch's weight-only int4
kernel (bf16 activations).
"""

from __future__ import annotations

import time
import warnings

from xbench.env import cpu_features

ROWS, HIDDEN, FFN = 2048, 384, 1536  # a batch of 32 pairs x 64 tokens; MiniLM-L6's hidden and FFN widths
def _rate(fn, ops: float, min_s: float) -> float:
    fn()  # warm-up: first-call packing and allocation
    reps, start = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - start < min_s:
        fn()
        reps += 1
    return ops * reps / (time.perf_counter() - start) / 1e9


def gemm_ceilings(threads: int, min_s: float = 1.0, rows: int = ROWS) -> dict[str, float]:
    """GOP/s of one [rows x HIDDEN] x [HIDDEN x FFN] GEMM per precision on `threads` threads."""
    import torch

    from xbench.backends.torch_backend import Int4Linear

    torch.set_num_threads(threads)
    ops = 2 * rows * HIDDEN * FFN
    torch.manual_seed(0)
    x = torch.randn(rows, HIDDEN)
    linear = torch.nn.Linear(HIDDEN, FFN)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            a, w, b = x.to(dtype), linear.weight.to(dtype), linear.bias.to(dtype)
            out[name] = _rate(lambda: torch.nn.functional.linear(a, w, b), ops, min_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao deprecation notes
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            q = quantize_dynamic(torch.nn.Sequential(linear), {"0": per_channel_dynamic_qconfig}, dtype=torch.qint8)
        out["int8"] = _rate(lambda: q(x), ops, min_s)
        int4 = Int4Linear(linear)
        out["int4"] = _rate(lambda: int4(x), ops, min_s)
    return out


def ceilings_table(rates: dict[str, float], threads: int, rows: int = ROWS):
    from rich.table import Table

    table = Table(title="CPU GEMM ceiling per precision", header_style="bold", min_width=76,
                  caption=f"{rows}x{HIDDEN} @ {HIDDEN}x{FFN}, {threads} threads; extensions: "
                          f"{' '.join(cpu_features()) or 'unknown'}.\nOn x86, bf16/fp16 beat fp32 only with AVX-512 "
                          "BF16/FP16 or AMX; int8 gains most with VNNI or AMX.")
    for col in ("precision", "GOP/s", "× fp32"):
        table.add_column(col, justify="left" if col == "precision" else "right")
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.1f}", f"{rate / rates['fp32']:.2f}")
    return table
