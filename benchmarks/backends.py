"""Benchmark: every backend x precision against sentence-transformers' CrossEncoder.predict.

In one process, on the same default-workload pairs cut into the same batches of 32 (length-
bucketed, as the batcher cuts them), every path timed from strings: each batch's text tokenized
inside the timer (CrossEncoder.predict with its tokenizer; the backends with xbench's), then one
forward. Pairs/s of each path, its ratio to the baseline (CrossEncoder.predict at fp32, same
weights) measured in the same run, and its fidelity against the PyTorch fp32 reference (max
|score diff| of logits, Spearman). Rounds are interleaved so drift hits
every path alike. First it times one FFN-shaped GEMM per precision (`xbench backends --measure`):
the ceiling each precision can reach on this CPU. Prints rich tables and writes JSON.

    python benchmarks/backends.py [--pairs 1024] [--rounds 2] [--paths pytorch:fp32,onnx:int8,...]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from xbench.backends import create_backend
from xbench.bench.ceilings import ceilings_table, gemm_ceilings
from xbench.env import cpu_features
from xbench.bench.runners import progress_bar
from xbench.config import compose_config
from xbench.bench.batches import model_batches
from xbench.core.batcher import ModelBatch
from xbench.core.model_pool import threads_per_worker
from xbench.core.pipeline import warmup_backend
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.checkpoints import resolve_model
from xbench.results.store import environment, write_json
from xbench.workload import synthetic

# fp16 on CPU is left out: without AVX-512 FP16 it runs as slowly as emulated bf16 (GPU check covers it).
DEFAULT_PATHS = ("pytorch:fp32,pytorch:bf16,pytorch:int8,pytorch:int4,compiled:fp32,compiled:bf16,"
                 "onnx:fp32,onnx:int8,onnx:int4,ctranslate2:fp32,ctranslate2:int8,openvino:fp32,openvino:bf16,openvino:int8")
console = Console(width=150)


def main(
    pairs: int = typer.Option(1024, help="Pairs timed per path per round."),
    fidelity_pairs: int = typer.Option(256, help="Pairs compared against the PyTorch fp32 reference."),
    batch: int = typer.Option(32, help="Rows per forward pass (and CrossEncoder.predict batch_size)."),
    rounds: int = typer.Option(2, help="Interleaved rounds."),
    paths: str = typer.Option(DEFAULT_PATHS, help="backend:precision list (add mlx:fp32 on Apple Silicon)."),
    model: str = typer.Option("xbench/minilm-l6-seeded", help="Model spec."),
    out: Path = typer.Option(Path("results/benchmarks/backends.json"), "--out", "-o"),
) -> None:
    from sentence_transformers import CrossEncoder

    threads = threads_per_worker(1, None)
    with console.status("timing one GEMM per precision ..."):
        ceilings = gemm_ceilings(threads)
    console.print(ceilings_table(ceilings, threads))
    resolved = resolve_model(model)
    text_pairs = synthetic(max(pairs, 4096), seed=0).pairs(pairs)
    tok = TokenizerPool(load_tokenizer(resolved.path, 512))
    cuts = [idx for idx, _ in model_batches(tok.encode(text_pairs), batch)]  # the batcher's cuts, by length
    texts = [[text_pairs[k] for k in idx] for idx in cuts]
    fid_idx = np.arange(min(fidelity_pairs, pairs))

    def run_all(backend) -> tuple[np.ndarray, float]:
        logits = np.empty(pairs, dtype=np.float32)
        start = time.perf_counter()
        for idx, batch_texts in zip(cuts, texts):
            enc = tok.encode(batch_texts)
            logits[idx] = ModelBatch(enc.flat_ids, enc.flat_types, enc.lengths).forward(backend)
        return logits, pairs / (time.perf_counter() - start)

    def run_baseline() -> float:
        start = time.perf_counter()
        for batch_texts in texts:
            baseline.predict(batch_texts, batch_size=len(batch_texts), show_progress_bar=False, activation_fn=None)
        return pairs / (time.perf_counter() - start)

    cfg = compose_config([f"model_pool.instances.0.name={model}"])
    loaded: dict[str, object] = {}
    with console.status("loading every path (ONNX exports are cached after the first run) ..."):
        baseline = CrossEncoder(str(resolved.path), device="cpu", max_length=512)
        baseline.predict(text_pairs[:batch], batch_size=batch, show_progress_bar=False)
        for spec in paths.split(","):
            backend_name, precision = spec.split(":")
            inst = cfg.model_pool.instances[0].copy()
            inst.backend, inst.quantization = backend_name, precision
            t0 = time.perf_counter()
            b = create_backend(inst, str(resolved.path), threads=threads)
            warmup_backend(b)
            loaded[spec] = b
            console.log(f"{spec}: ready in {time.perf_counter() - t0:.1f}s (load + warm-up/compile)")

    speed: dict[str, list[float]] = {"baseline": [], **{k: [] for k in loaded}}
    scores: dict[str, np.ndarray] = {}
    with progress_bar(console) as progress:
        task = progress.add_task("interleaved rounds", total=rounds * (len(loaded) + 1))
        for _ in range(rounds):
            speed["baseline"].append(run_baseline())
            progress.advance(task)
            for spec, b in loaded.items():
                scores[spec], pps = run_all(b)
                speed[spec].append(pps)
                progress.advance(task)

    ref = scores.get("pytorch:fp32")
    base = statistics.fmean(speed["baseline"])
    table = Table(title=f"Backends vs CrossEncoder.predict (fp32, batch {batch}), {pairs} pairs, {rounds} interleaved rounds")
    for col in ("path", "computed", "pairs/s per round", "mean pairs/s", "× baseline", "max |Δ logit|", "Spearman"):
        table.add_column(col, justify="left" if col in ("path", "computed") else "right")
    table.add_row("baseline: sentence-transformers", "fp32", " ".join(f"{x:.1f}" for x in speed["baseline"]),
                  f"{base:.1f}", "1.00", "", "")
    rows = []
    for spec in loaded:
        mean = statistics.fmean(speed[spec])
        diff = rho = None
        if ref is not None:
            diff = float(np.abs(scores[spec][fid_idx] - ref[fid_idx]).max())
            rho = float(spearmanr(scores[spec][fid_idx], ref[fid_idx]).statistic)
        rows.append({"path": spec, "pairs_per_s": speed[spec], "mean_pairs_per_s": mean, "vs_baseline": mean / base,
                     "max_abs_diff": diff, "spearman": rho, "engine": loaded[spec].describe()})
        table.add_row(spec, loaded[spec].describe().get("computed", ""), " ".join(f"{x:.1f}" for x in speed[spec]), f"{mean:.1f}", f"{mean / base:.2f}",
                      "" if diff is None else f"{diff:.1e}", "" if rho is None else f"{rho:.4f}")
    console.print(table)
    tok.close()
    write_json(out, {"env": environment(), "model": resolved.info(), "pairs": pairs, "batch": batch, "rounds": rounds,
                     "cpu_features": cpu_features(), "gemm_ceilings_gops": ceilings, "baseline": {"name": "sentence_transformers.CrossEncoder.predict fp32, the same sorted batches",
                                  "pairs_per_s": speed["baseline"],
                                  "mean_pairs_per_s": base}, "paths": rows})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
