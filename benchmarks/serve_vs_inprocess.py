"""Benchmark: what HTTP costs. `xbench load` against `xbench serve` vs in-process pipeline-bench,
same backend, precision, batch and concurrency, interleaved in one run on one machine.

    python benchmarks/serve_vs_inprocess.py [--batch 128] [--concurrency 16] [--duration 30] [overrides]
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from xbench.bench.http import HttpTarget
from xbench.bench.runners import PipelineTarget, load_spec, measure
from xbench.config import compose_config, to_dict
from xbench.results.store import environment, write_json
from serving import start_server
from xbench.workload import make_workload

console = Console(width=140)


def main(
    overrides: Optional[List[str]] = typer.Argument(None),
    batch: int = typer.Option(128),
    concurrency: int = typer.Option(16),
    duration: float = typer.Option(30.0),
    warmup: float = typer.Option(8.0),
    rounds: int = typer.Option(2),
    out: Path = typer.Option(Path("results/benchmarks/serve_vs_inprocess.json"), "--out", "-o"),
) -> None:
    overrides = list(overrides or [])
    cfg = compose_config([*overrides, f"experiment.duration_s={duration}", f"experiment.warmup_s={warmup}"])
    workload = make_workload(None, cfg)
    server = start_server(overrides)
    inproc = PipelineTarget(cfg)
    http = HttpTarget(server.url, "cohere")
    spec = load_spec(cfg, concurrency)
    samples: dict[str, list[dict]] = {"pipeline-bench": [], "load": []}
    try:
        for r in range(rounds):
            for name, target in (("pipeline-bench", inproc), ("load", http)):
                with console.status(f"round {r + 1}/{rounds}: {name} ..."):
                    samples[name].append(asyncio.run(measure(target, workload, batch, spec)))
    finally:
        inproc.close()
        server.stop()
    table = Table(title=f"HTTP vs in-process, {cfg.model_pool.instances[0].backend} "
                        f"{cfg.model_pool.instances[0].quantization}, batch {batch}, concurrency {concurrency}")
    for col in ("measurement", "pairs/s per round", "mean pairs/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    mean = {}
    for name, runs in samples.items():
        mean[name] = statistics.fmean(s["summary"]["pairs_per_s"] for s in runs)
        table.add_row(name, " ".join(f"{s['summary']['pairs_per_s']:.1f}" for s in runs), f"{mean[name]:.1f}",
                      f"{statistics.fmean(s['latency_ms']['p50'] for s in runs):.0f}",
                      f"{statistics.fmean(s['latency_ms']['p99'] for s in runs):.0f}")
    console.print(table)
    ratio = mean["load"] / mean["pipeline-bench"]
    console.print(f"xbench load (HTTP) / pipeline-bench (in-process) = {ratio:.3f}")
    write_json(out, {"env": environment(), "config": to_dict(cfg), "batch": batch, "concurrency": concurrency,
                     "samples": samples, "ratio": ratio})


if __name__ == "__main__":
    typer.run(main)
