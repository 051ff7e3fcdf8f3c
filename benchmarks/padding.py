"""Benchmark: does the pipeline's cost follow real tokens?

In one run on one machine, on a long-tailed and an MS MARCO-shaped workload (requests of
`batch` documents of one query, cycling over the same pairs), interleaved round by round:

  baseline   a plain transformers fp32 forward over the same pairs, globally sorted by length,
             in batches of `batch` (the best a user gets by hand with a sorted, offline list)
  default    pipeline-bench with the default config (cost-model planner, packed execution),
             at concurrency `concurrency` and at concurrency 1
  cut only   the cost-model planner on padded batches (packed=false): what packing adds
  previous   the previous default (greedy max_batch_tokens cut, padded)
  int8       the default config at int8, with its Spearman against fp32 on the same pairs

Each pipeline row reports pairs/s, its ratio to the baseline of the same round and its padding
efficiency (real / computed tokens). Results go to JSON; the table goes in the README.

    python benchmarks/padding.py [--rounds 2] [--duration 15] [--pairs 512]
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from xbench.backends.torch_backend import TorchBackend
from xbench.bench.load import LoadSpec, generate
from xbench.bench.runners import PipelineTarget, progress_bar
from xbench.config import compose_config
from xbench.bench.batches import padded_batches
from xbench.core.pipeline import warmup_backend
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.checkpoints import resolve_model
from xbench.results.store import environment, write_json
from xbench.workload import Workload, length_profile, synthetic

console = Console(width=150)

VARIANTS = {  # name -> (overrides, concurrency or None for the --concurrency option)
    "default": ([], None),
    "default c1": ([], 1),
    "cut only (padded)": (["model_pool.instances.0.packed=false"], None),
    "previous default": (["model_pool.instances.0.packed=false", "batching.planner=tokens"], None),
    "default int8": (["model_pool.instances.0.quantization=int8"], None),
}


def baseline_pairs_per_s(backend: TorchBackend, enc, batch: int) -> float:
    """transformers' padded forward over the pairs sorted by length, `batch` rows a batch."""
    batches = padded_batches(enc, batch, bucketing=True)
    start = time.perf_counter()
    for _, arrays in batches:
        backend.forward(*arrays)
    return len(enc.ids) / (time.perf_counter() - start)


def main(
    rounds: int = typer.Option(2, help="Rounds; each measures every row once, so drift hits all alike."),
    duration: float = typer.Option(15.0, help="Seconds each pipeline row is measured per round."),
    warmup: float = typer.Option(3.0, help="Seconds of load before each pipeline row."),
    batch: int = typer.Option(32, help="Documents per request, and rows per baseline batch."),
    concurrency: int = typer.Option(4, help="Closed-loop clients of the pipeline rows."),
    pairs: int = typer.Option(512, help="Distinct pairs per workload (requests cycle over them)."),
    workloads: str = typer.Option("longtail,msmarco", help="Length mixes to measure."),
    only: Optional[str] = typer.Option(None, help="Comma-separated subset of the rows."),
    out: Path = typer.Option(Path("results/benchmarks/padding.json"), "--out", "-o"),
) -> None:
    variants = {k: v for k, v in VARIANTS.items() if not only or k in only.split(",")}
    model = resolve_model("default")
    tok = TokenizerPool(load_tokenizer(model.path, 512))
    mixes: dict[str, tuple[Workload, object]] = {}
    for mix in workloads.split(","):
        w = synthetic(pairs, seed=0, docs_per_query=batch, lengths=mix)
        mixes[mix] = (w, tok.encode(w.pairs(pairs)))
    with console.status("loading the baseline and one pipeline per row (each calibrates its cost model) ..."):
        baseline = TorchBackend(str(model.path), "cpu", "fp32", threads=2, packed=False)
        warmup_backend(baseline)
        targets = {name: PipelineTarget(compose_config(ov)) for name, (ov, _) in variants.items()}
    samples: dict[str, dict[str, list[float]]] = {m: {k: [] for k in ["baseline", *variants]} for m in mixes}
    efficiency: dict[str, dict[str, float]] = {m: {} for m in mixes}
    with progress_bar(console) as progress:
        task = progress.add_task("rounds", total=rounds * len(mixes) * (1 + len(variants)))
        for _ in range(rounds):
            for mix, (w, enc) in mixes.items():
                samples[mix]["baseline"].append(baseline_pairs_per_s(baseline, enc, batch))
                progress.advance(task)
                for name, target in targets.items():
                    c = variants[name][1] or concurrency
                    before = target.token_counts()
                    spec = LoadSpec(concurrency=c, duration_s=duration, warmup_s=warmup)
                    stats = asyncio.run(generate(target.sender(w, batch), spec))
                    samples[mix][name].append(stats["summary"]["pairs_per_s"])
                    efficiency[mix][name] = target.token_counts().since(before)["efficiency"]
                    progress.advance(task)
    fidelity = {}
    if "default int8" in targets and "default" in targets:
        for mix, (w, _) in mixes.items():
            ps = w.pairs(pairs)
            fp32 = targets["default"].pipeline.submit(ps).result().logits
            int8 = targets["default int8"].pipeline.submit(ps).result().logits
            fidelity[mix] = float(spearmanr(int8, fp32).statistic)
    for target in targets.values():
        target.close()
    tok.close()

    doc = {"env": environment(), "batch": batch, "concurrency": concurrency, "rounds": rounds, "workloads": {}}
    for mix, (w, enc) in mixes.items():
        base = statistics.fmean(samples[mix]["baseline"])
        table = Table(title=f"{mix}: pytorch, batch {batch}, concurrency {concurrency} unless noted, "
                            f"{rounds} interleaved rounds; baseline = transformers fp32, globally sorted")
        for col in ("row", "pairs/s per round", "mean", "÷ baseline", "real / computed tokens", "Spearman vs fp32"):
            table.add_column(col, justify="left" if col == "row" else "right")
        rows = {}
        for name, values in samples[mix].items():
            mean = statistics.fmean(values)
            eff = efficiency[mix].get(name)
            rho = fidelity.get(mix) if name == "default int8" else None
            rows[name] = {"pairs_per_s": values, "mean": mean, "ratio": mean / base, "efficiency": eff, "spearman": rho}
            table.add_row(name, " ".join(f"{x:.1f}" for x in values), f"{mean:.1f}", f"{mean / base:.2f}",
                          "-" if eff is None else f"{eff:.0%}", "-" if rho is None else f"{rho:.4f}")
        console.print(table)
        doc["workloads"][mix] = {"pair_tokens": length_profile(enc.lengths, 512), "rows": rows}
    write_json(out, doc)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
