"""Benchmark: where each CPU path spends its time, operator by operator, on the same pairs.

For each path (PyTorch packed and OpenVINO at the precisions that compete, `--paths`) and each
workload (MS MARCO-shaped and long-tailed), the same pre-tokenized pairs cut into the batcher's
batches of --batch run once to warm up, once timed, and once profiled: PyTorch under
torch.profiler (self time of every operator), OpenVINO with its CPU plugin's per-node counters
(`PERF_COUNT`: real time of every executed node). Operators fall into the same five kinds on both
engines:

  GEMM        matrix products: Linear layers (fp32, bf16 on AMX, int8 dynamic or static), head
  attention   the attention kernel itself (SDPA, OpenVINO's fused ScaledDotProductAttention)
  layout      gathers, scatters, copies, concatenations, transposes, reorders, zero fills
  norm/act    layer norms, GELU, residual adds and other element-wise work
  other       everything else (embeddings lookups, framework overhead an engine names)

Tokenization (xbench's tokenizer, the same for every path) is timed on its own. The table gives
each path's pairs/s (the timed pass, no profiler) and milliseconds per 1,000 pairs in each kind
(from the profiled pass, scaled to the timed pass's total), so two paths can be read side by side:
what one spends that the other does not.

    python benchmarks/profile_cpu.py [--pairs 512] [--paths pytorch:bf16,openvino:bf16,pytorch:int8,openvino:int8]
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from xbench.backends import create_backend
from xbench.bench.batches import model_batches
from xbench.checkpoints import resolve_model
from xbench.config import compose_config
from xbench.core.model_pool import threads_per_worker
from xbench.core.pipeline import warmup_backend
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.results.store import environment, write_json
from xbench.workload import make_workload

console = Console(width=150)
KINDS = ("GEMM", "attention", "layout", "norm/act", "other")

# PyTorch operator names (self time) by kind; anything unlisted is "other".
TORCH_KINDS = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "quantized::linear_dynamic",
             "aten::_weight_int4pack_mm_for_cpu", "mkldnn", "aten::_addmm_activation"),
    "attention": ("scaled_dot_product",),
    "layout": ("index_select", "index_copy", "aten::copy_", "aten::cat", "aten::zeros", "aten::new_zeros",
               "aten::fill_", "aten::contiguous", "aten::clone", "aten::empty", "aten::stack", "aten::to",
               "aten::_to_copy", "aten::transpose", "aten::reshape", "aten::view", "aten::permute",
               "aten::as_strided", "aten::select", "aten::slice", "aten::unbind", "aten::index"),
    "norm/act": ("layer_norm", "aten::gelu", "aten::add", "aten::mul", "aten::tanh", "aten::div", "aten::sub",
                 "aten::relu", "aten::silu", "aten::pow", "aten::rsqrt", "aten::mean", "aten::neg"),
}
# OpenVINO CPU plugin node types by kind.
OV_KINDS = {
    "GEMM": ("FullyConnected", "MatMul", "Convolution"),
    "attention": ("ScaledDotProductAttention", "ScaledAttn", "MHA", "Softmax"),  # and fused SDPA Subgraphs
    "layout": ("Reorder", "Transpose", "Reshape", "Gather", "Concatenation", "Concat", "Split", "StridedSlice",
               "Broadcast", "Squeeze", "Unsqueeze", "ShapeOf", "Convert", "Select", "Slice"),
    "norm/act": ("MVN", "Eltwise", "Subgraph", "RMS", "Multiply", "Add", "Gelu", "Math", "Power"),
}


def kind_of(name: str, table: dict[str, tuple[str, ...]]) -> str:
    for kind, names in table.items():
        if any(n in name for n in names):
            return kind
    return "other"


def torch_profile(run) -> dict[str, float]:
    """Seconds of self CPU time per kind over one call of `run`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    spent: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        spent[kind_of(event.key, TORCH_KINDS)] += event.self_cpu_time_total / 1e6
    return dict(spent)


def openvino_profile(backend, batches) -> dict[str, float]:
    """Seconds of node real time per kind over the batches, on a copy of the backend's compiled
    IR with the CPU plugin's performance counters on (the timed backend runs without them)."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": backend.compiled.get_property("INFERENCE_PRECISION_HINT"),
              "INFERENCE_NUM_THREADS": backend.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "PERF_COUNT": True}
    compiled = core.compile_model(core.read_model(str(backend.path)), "CPU", config)
    request = compiled.create_infer_request()
    names = {i.get_any_name() for i in compiled.inputs}
    spent: dict[str, float] = defaultdict(float)
    for _, batch in batches:
        ids, mask, types = batch.padded
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        request.infer({k: v for k, v in feeds.items() if k in names})
        for node in request.get_profiling_info():
            if str(node.status).endswith("EXECUTED"):
                # The CPU plugin fuses attention into a "Subgraph" node named after the SDPA it replaced.
                kind = "attention" if "scaled_dot_product" in node.node_name else kind_of(node.node_type, OV_KINDS)
                spent[kind] += node.real_time.total_seconds()
    return dict(spent)


def main(
    pairs: int = typer.Option(512, help="Pairs per workload."),
    batch: int = typer.Option(32, help="Rows per batch (the batcher's cut)."),
    paths: str = typer.Option("pytorch:bf16,openvino:bf16,pytorch:int8,openvino:int8,pytorch:fp32,openvino:fp32",
                              help="backend:precision list."),
    model: str = typer.Option("xbench/minilm-l6-seeded", help="Model spec."),
    out: Path = typer.Option(Path("results/benchmarks/profile_cpu.json"), "--out", "-o"),
) -> None:
    threads = threads_per_worker(1, None)
    resolved = resolve_model(model)
    cfg = compose_config([f"model_pool.instances.0.name={model}"])
    backends = {}
    with console.status("loading every path (exports and IRs are cached after the first run) ..."):
        for spec in paths.split(","):
            name, precision = spec.split(":")
            inst = cfg.model_pool.instances[0].copy()
            inst.backend, inst.quantization = name, precision
            backends[spec] = create_backend(inst, str(resolved.path), threads=threads)
            warmup_backend(backends[spec])
    tok = TokenizerPool(load_tokenizer(resolved.path, 512))
    report: dict = {"env": environment(), "model": resolved.info(), "pairs": pairs, "batch": batch,
                    "threads": threads, "workloads": {}}
    table = Table(title=f"Where the time goes: ms per 1,000 pairs by kind, {pairs} pairs, batch {batch}, "
                        f"{threads} threads")
    for col in ("workload", "path", "computed", "pairs/s", *KINDS):
        table.add_column(col, justify="left" if col in ("workload", "path", "computed") else "right")
    for lengths in ("msmarco", "longtail"):
        text_pairs = make_workload(None, compose_config([f"workload.lengths={lengths}"])).pairs(pairs)
        tok.encode(text_pairs[:batch])  # warm
        t0 = time.perf_counter()
        enc = tok.encode(text_pairs)
        tokenize_ms = (time.perf_counter() - t0) * 1000 * 1000 / pairs
        batches = model_batches(enc, batch)
        rows = {"tokenize_ms_per_1k_pairs": tokenize_ms}
        table.add_row(lengths, "tokenization (every path)", "", "", *[""] * (len(KINDS) - 1), f"{tokenize_ms:.0f}")
        for spec, backend in backends.items():
            def run() -> None:
                for _, b in batches:
                    b.forward(backend)

            run()  # warm: shapes seen once
            start = time.perf_counter()
            run()
            took = time.perf_counter() - start
            spent = (openvino_profile(backend, batches) if spec.startswith("openvino")
                     else torch_profile(run))
            scale = took / max(sum(spent.values()), 1e-12)  # profiled shares of the timed pass
            per_k = {k: spent.get(k, 0.0) * scale * 1000 * 1000 / pairs for k in KINDS}
            rows[spec] = {"pairs_per_s": pairs / took, "ms_per_1k_pairs": per_k,
                          "computed": backend.describe().get("computed", "")}
            table.add_row(lengths, spec, rows[spec]["computed"], f"{pairs / took:.0f}",
                          *[f"{per_k[k]:.0f}" for k in KINDS])
        report["workloads"][lengths] = rows
    tok.close()
    console.print(table)
    write_json(out, report)
    console.print(f"[dim]raw: {out}[/]")


if __name__ == "__main__":
    typer.run(main)
