"""GPU check: fidelity of the CUDA paths against the PyTorch fp32 reference, and their raw forward.

    python scripts/gpu_check.py [--model DIR] [--paths pytorch:fp16,pytorch:fp16:padded,...]
    python scripts/gpu_check.py --summary    # after pipeline-bench: pipeline ÷ raw forward

Fidelity: the same 256 long-tailed pairs scored by each CUDA path (packed and padded PyTorch,
compiled, ONNX, CTranslate2) against transformers' padded fp32 forward on the CPU, same weights.
Raw forward: each path alone on 2048 pre-tokenized pairs per workload (MS MARCO-shaped and
long-tailed), globally sorted by length and cut into batches of 128: the ceiling the pipeline
is held to. Writes results/gpu/fidelity.json; `--summary` reads it with the pipeline-bench
files that scripts/gpu_check.sh writes next to it and prints pipeline ÷ raw forward.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from xbench.backends import create_backend
from xbench.config import ModelInstanceConfig
from xbench.bench.batches import model_batches
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.checkpoints import resolve_model
from xbench.results.store import environment, write_json
from xbench.workload import synthetic

RESULTS = Path("results/gpu")
WORKLOADS = ("msmarco", "longtail")
# backend:precision[:padded]; without `padded` the backend's default (packed where it can)
# (`graphs`: packed, replayed as CUDA graphs)
PATHS = ("pytorch:fp32,pytorch:fp16,pytorch:fp16:graphs,pytorch:fp16:padded,pytorch:bf16,compiled:fp16,compiled:bf16,"
         "onnx:fp32,onnx:fp16,ctranslate2:fp16,ctranslate2:int8")


def encoded(model_path: Path, lengths: str, pairs: int):
    tok = TokenizerPool(load_tokenizer(model_path, 512))
    enc = tok.encode(synthetic(8192, seed=0, lengths=lengths).pairs(pairs))
    tok.close()
    return enc


def forward_rate(backend, batches, pairs: int, device: str, passes: int = 3) -> float:
    for idx, batch in batches:  # load, compile, warm up (and pad, for a backend that takes padded batches)
        batch.forward(backend)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(passes):
        for idx, batch in batches:
            batch.forward(backend)  # returns host logits: each batch ends synchronized
    return passes * pairs / (time.perf_counter() - t0)


def check(model_name: str, paths: list[str], device: str) -> None:
    console = Console(width=160)
    model = resolve_model(model_name)
    fidelity_batches = model_batches(encoded(model.path, "longtail", 256), 128)
    speed_batches = {w: model_batches(encoded(model.path, w, 2048), 128) for w in WORKLOADS}

    def scores(backend) -> np.ndarray:
        out = np.empty(256, dtype=np.float32)
        for idx, batch in fidelity_batches:
            out[idx] = batch.forward(backend)
        return out

    reference = scores(create_backend(ModelInstanceConfig(backend="pytorch", device="cpu", packed=False),
                                      str(model.path), 8))
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else device
    table = Table(title=f"{device} paths vs PyTorch fp32 on the CPU, {model_name} ({device_name}); forward = "
                        "2048 pairs sorted by length, batches of 128")
    for col in ("path", "max |Δ logit|", "Spearman", *(f"forward pairs/s {w}" for w in WORKLOADS), "ready s"):
        table.add_column(col)
    rows = []
    for path in paths:
        backend_name, precision, *rest = path.split(":")
        packed = False if rest == ["padded"] else None
        graphs = True if rest == ["graphs"] else None
        try:
            t0 = time.perf_counter()
            backend = create_backend(ModelInstanceConfig(backend=backend_name, device=device, quantization=precision,
                                                         packed=packed, cuda_graphs=graphs), str(model.path), 4)
            got = scores(backend)  # also compiles the shapes it sees first
            ready = time.perf_counter() - t0
            rates = {w: forward_rate(backend, speed_batches[w], 2048, device) for w in WORKLOADS}
        except Exception as exc:  # e.g. onnxruntime without the CUDA provider, ctranslate2 not installed
            rows.append({"path": path, "error": str(exc)[:300]})
            table.add_row(path, "unavailable", str(exc).splitlines()[0][:70] if str(exc) else type(exc).__name__)
            continue
        diff, rho = float(np.abs(got - reference).max()), float(spearmanr(got, reference).statistic)
        rows.append({"path": path, "max_abs_diff": diff, "spearman": rho, "ready_s": ready,
                     "forward_pairs_per_s": rates})
        table.add_row(path, f"{diff:.1e}", f"{rho:.4f}", *(f"{rates[w]:,.0f}" for w in WORKLOADS), f"{ready:.1f}")
        del backend
        if device == "cuda":
            torch.cuda.empty_cache()
    console.print(table)
    write_json(RESULTS / "fidelity.json", {"env": environment(), "model": model_name, "device": device_name,
                                           "paths": rows})


def summary() -> None:
    """pipeline-bench pairs/s ÷ the same path's raw forward, per workload."""
    raw = {row["path"]: row.get("forward_pairs_per_s", {})
           for row in json.loads((RESULTS / "fidelity.json").read_text())["paths"]}
    table = Table(title="b128 c16: each command's pairs/s ÷ the path's raw forward (batches of 128 sorted by length); "
                        "eager: the path without CUDA graphs")
    for col in ("file", "pairs/s", "raw forward pairs/s", "÷ raw", "÷ eager raw", "stable"):
        table.add_column(col)
    for f in sorted(RESULTS.glob("*.json")):
        if f.name == "fidelity.json":
            continue
        doc = json.loads(f.read_text())
        inst = doc["config"]["model_pool"]["instances"][0]
        path, lengths = f"{inst['backend']}:{inst['quantization']}", doc["config"]["workload"]["lengths"]
        eager = raw.get(path, {}).get(lengths)
        if inst.get("cuda_graphs"):
            path += ":graphs"
        forward = raw.get(path, {}).get(lengths)
        rate = doc["summary"]["pairs_per_s"]
        table.add_row(f.name, f"{rate:,.0f}", f"{forward:,.0f}" if forward else "-",
                      f"{rate / forward:.2f}" if forward else "-", f"{rate / eager:.2f}" if eager else "-",
                      str(doc["stability"]["stable"]))
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="xbench/minilm-l6-seeded", help="model name or local folder")
    parser.add_argument("--paths", default=PATHS, help="comma-separated backend:precision[:padded]")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script here")
    parser.add_argument("--summary", action="store_true", help="only print pipeline ÷ raw forward")
    args = parser.parse_args()
    if args.summary:
        summary()
    else:
        check(args.model, args.paths.split(","), args.device)


if __name__ == "__main__":
    main()
