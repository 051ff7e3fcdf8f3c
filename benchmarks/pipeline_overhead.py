"""Benchmark: what the pipeline costs over raw forward passes, and what length bucketing buys.

In one run on one machine, on the default workload:
  1. raw forward: the backend alone on pre-tokenized batches cut the way the batcher cuts them
     (each request of `batch` pairs sorted by length, max_batch_size rows per batch);
  2. the same pairs cut in arrival order (naive padding);
  3. infer-bench and 4. pipeline-bench at `batch` pairs per request, `concurrency` clients.
Prints a table with the ratios and writes them to JSON.

    python benchmarks/pipeline_overhead.py [--batch 128] [--concurrency 16] [--duration 40] [overrides]
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from xbench.backends import create_backend
from xbench.bench.load import generate
from xbench.bench.runners import InferTarget, PipelineTarget, load_spec, progress_bar
from xbench.config import compose_config, to_dict
from xbench.bench.batches import padded_batches
from xbench.core.model_pool import threads_per_worker
from xbench.core.pipeline import warmup_backend
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.checkpoints import resolve_model
from xbench.results.store import environment, write_json
from xbench.workload import make_workload

console = Console(width=140)


def raw_forward_pairs_per_s(backend, encoded, cfg, bucketing: bool) -> float:
    batches = [arrays for enc in encoded
               for _, arrays in padded_batches(enc, cfg.batching.max_batch_size, cfg.batching.max_batch_tokens, bucketing)]
    pairs = sum(len(e.ids) for e in encoded)
    start = time.perf_counter()
    for ids, mask, types in batches:
        backend.forward(ids, mask, types)
    return pairs / (time.perf_counter() - start)


def main(
    overrides: Optional[List[str]] = typer.Argument(None),
    batch: int = typer.Option(128, help="Pairs per request."),
    concurrency: int = typer.Option(16, help="Closed-loop clients for the pipeline benches."),
    duration: float = typer.Option(20.0, help="Seconds measured by each bench in each round."),
    warmup: float = typer.Option(5.0, help="Seconds of warm-up load before each bench."),
    rounds: int = typer.Option(3, help="Rounds; each measures every variant once, so drift hits all alike."),
    requests: int = typer.Option(4, help="Requests of `batch` pairs in each raw-forward measurement."),
    lone_batch: int = typer.Option(1, help="Pairs per request in the concurrency-1 latency comparison."),
    lone_requests: int = typer.Option(150, help="Requests timed in the concurrency-1 latency comparison."),
    out: Path = typer.Option(Path("results/benchmarks/pipeline_overhead.json"), "--out", "-o"),
) -> None:
    cfg = compose_config([*(overrides or []), f"experiment.batch_sizes=[{batch}]",
                          f"experiment.concurrency_levels=[{concurrency}]",
                          f"experiment.duration_s={duration}", f"experiment.warmup_s={warmup}"])
    inst = cfg.model_pool.instances[0]
    model = resolve_model(inst.name)
    workload = make_workload(None, cfg)
    tok = TokenizerPool(load_tokenizer(model.path, min(inst.max_length, model.max_position_embeddings)))
    encoded = [tok.encode(workload.request(i, batch).pairs) for i in range(requests)]
    tok.close()

    with console.status("loading ..."):
        backend = create_backend(inst, str(model.path), threads_per_worker(1, cfg.model_pool.threads_per_worker))
        warmup_backend(backend)
        targets = {"infer-bench": InferTarget(cfg), "pipeline-bench": PipelineTarget(cfg)}
    # Variants are interleaved round by round: this machine's speed drifts by tens of
    # percent over minutes, and a ratio is only fair between neighbours.
    samples: dict[str, list[float]] = {k: [] for k in ("raw_bucketed", "raw_naive", "infer-bench", "pipeline-bench")}
    with progress_bar(console) as progress:
        task = progress.add_task("rounds", total=rounds * 4)
        for _ in range(rounds):
            samples["raw_bucketed"].append(raw_forward_pairs_per_s(backend, encoded, cfg, bucketing=True))
            progress.advance(task)
            samples["raw_naive"].append(raw_forward_pairs_per_s(backend, encoded, cfg, bucketing=False))
            progress.advance(task)
            for name, target in targets.items():
                stats = asyncio.run(generate(target.sender(workload, batch), load_spec(cfg, concurrency)))
                samples[name].append(stats["summary"]["pairs_per_s"])
                progress.advance(task)
    # Concurrency 1: what the pipeline adds to a lone request over tokenizing and running it
    # directly. The batcher must not hold an idle model back waiting for its timeout.
    lone_direct, lone_pipeline = [], []
    pipe = targets["pipeline-bench"].pipeline
    tok = TokenizerPool(load_tokenizer(model.path, min(inst.max_length, model.max_position_embeddings)))
    with console.status("concurrency 1 ..."):
        for i in range(lone_requests):
            pairs = workload.request(1000 + i, lone_batch).pairs
            start = time.perf_counter()
            for _, arrays in padded_batches(tok.encode(pairs), cfg.batching.max_batch_size, cfg.batching.max_batch_tokens):
                backend.forward(*arrays)
            lone_direct.append(time.perf_counter() - start)
            start = time.perf_counter()
            pipe.submit(pairs).result()
            lone_pipeline.append(time.perf_counter() - start)
    tok.close()
    for target in targets.values():
        target.close()
    lone = {"direct_p50_ms": 1000 * statistics.median(lone_direct), "pipeline_p50_ms": 1000 * statistics.median(lone_pipeline)}
    lone["added_ms"] = lone["pipeline_p50_ms"] - lone["direct_p50_ms"]

    mean = {k: statistics.fmean(v) for k, v in samples.items()}
    raw = mean["raw_bucketed"]
    labels = {
        "raw_bucketed": "raw forward, length-bucketed batches",
        "raw_naive": "raw forward, arrival-order batches (naive padding)",
        "infer-bench": "infer-bench (batcher + model pool)",
        "pipeline-bench": "pipeline-bench (tokenizer + batcher + model pool)",
    }
    table = Table(title=f"Pipeline overhead: {inst.backend} {inst.quantization}, batch {batch}, "
                        f"concurrency {concurrency}, {rounds} interleaved rounds")
    table.add_column("measurement")
    table.add_column("pairs/s per round", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("÷ raw bucketed", justify="right")
    for key, label in labels.items():
        table.add_row(label, " ".join(f"{x:.1f}" for x in samples[key]), f"{mean[key]:.1f}", f"{mean[key] / raw:.3f}")
    console.print(table)
    pipeline_ratio = mean["pipeline-bench"] / raw
    bucketing_gain = raw / mean["raw_naive"]
    console.print(f"pipeline-bench / raw forward = {pipeline_ratio:.3f}; "
                  f"bucketed / naive padding = {bucketing_gain:.2f}x")
    console.print(f"concurrency 1, {lone_batch} pairs: direct p50 {lone['direct_p50_ms']:.1f} ms, pipeline p50 "
                  f"{lone['pipeline_p50_ms']:.1f} ms: the pipeline adds {lone['added_ms']:.2f} ms")
    write_json(out, {"env": environment(), "config": to_dict(cfg), "rounds": rounds, "samples_pairs_per_s": samples,
                     "mean_pairs_per_s": mean, "pipeline_over_raw": pipeline_ratio, "bucketing_gain": bucketing_gain,
                     "concurrency_1": lone})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
