"""Benchmark: the host's Python cost per pair around a stand-in GPU model (what the pipeline costs beside a GPU).

On a GPU the forward pass barely needs the host (with CUDA graphs, one replay per batch), so the
pipeline's own Python caps its pairs/s: the batcher planning and collating, the model pool
handing scores back, requests going out to the tokenizer processes and coming back, the load
generator. This runs pipeline-bench's and infer-bench's own targets and load generator around a
stand-in backend that sleeps its "GPU time" (`--gpu-us` per pair) without holding the GIL, with
tokenizer processes as beside a CUDA model, and reports pairs/s and the main process's CPU
microseconds per pair on both workloads. `--against REV` measures a git revision too, in
alternating rounds (each measurement in a fresh interpreter).

On this 2-core machine one tokenizer process caps pipeline-bench, which hides the main process's
own limit. `--stand-in-tokenizer` keeps the processes and their traffic but has them return ids of
about the right lengths without tokenizing, as fast as a many-core GPU host's eight processes: the
pipeline is then bound by the main process, as it is beside a GPU.

An eager PyTorch forward on a GPU is not free for the host: launching its kernels holds the GIL
for about as long as the GPU runs them. `--launch-us` gives the stand-in that cost per batch, and
`--modes thread,process` measures the model pool with the backend in the main process and in a
model process of its own side by side; every round also times the stand-in alone, the "raw
forward" the pipeline is held to.

    python benchmarks/host_overhead.py [--gpu-us 8] [--launch-us 2000] [--duration 8] [--rounds 3]
        [--against HEAD~1] [--workers 2] [--modes thread,process] [--stand-in-tokenizer]
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
console = Console(width=140)


class StandInBackend:
    """Scores zeros as a GPU model would take them. `launch_s` a batch is the host launching its
    kernels: Python that holds the GIL, as an eager PyTorch forward does. `gpu_s` a pair is the
    GPU running them, with the GIL free; it overlaps the launching, so a batch takes the longer
    of the two. Every worker's stand-in in one process shares one "GPU": one batch runs at a
    time, so two model workers can overlap one batch's host work with another's GPU time, not
    double the GPU."""

    packed = True
    varlen_attention = True
    flat_input = True
    gpu = threading.Lock()

    def __init__(self, gpu_s: float, launch_s: float = 0.0):
        self.gpu_s = gpu_s
        self.launch_s = launch_s

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.forward_packed(None, None, attention_mask.sum(1))

    def forward_packed(self, flat_ids, flat_types, lengths):  # takes flat batches, as PyTorch's packed model does
        import numpy as np

        start = time.thread_time()  # this thread's CPU time: it advances only while the thread runs
        while time.thread_time() - start < self.launch_s:  # Python, holding the GIL, as launching does
            pass
        with self.gpu:  # the GPU ran the kernels as they came: what is left of its time after the launches
            time.sleep(max(0.0, self.gpu_s * len(lengths) - self.launch_s))
        return np.zeros(len(lengths), dtype=np.float32)

    def describe(self) -> dict:
        return {"engine": "stand-in", "gpu_us_per_pair": self.gpu_s * 1e6, "launch_us_per_batch": self.launch_s * 1e6}


def stand_in_backend(gpu_s: float, launch_s: float, inst, model_dir: str, threads: int,
                     label_ids: tuple[int, ...] | None = None) -> StandInBackend:
    """create_backend's stand-in; a module function, so a model process can be sent it."""
    return StandInBackend(gpu_s, launch_s)


def raw_forward(gpu_s: float, launch_s: float, batch: int, duration: float) -> dict:
    """The stand-in alone, batches of `batch` pairs back to back: what the pipeline is held to."""
    backend, lengths, done = StandInBackend(gpu_s, launch_s), [0] * batch, 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        backend.forward_packed(None, None, lengths)
        done += batch
    return {"pairs_per_s": done / (time.perf_counter() - start), "cpu_us_per_pair": None}


def stand_in_encode(pairs: list[tuple[str, str]], direction: str):
    """What a tokenizer process hands back, made without tokenizing: per pair, ids about as many
    as BERT's word pieces of its words (1.2 a word, plus 3 special tokens)."""
    import numpy as np

    from xbench.core.tokenizer_pool import Encoded

    words = np.fromiter((q.count(" ") + d.count(" ") + 2 for q, d in pairs), dtype=np.int64, count=len(pairs))
    lengths = np.minimum(3 + words * 6 // 5, 512)
    make = getattr(Encoded, "from_pairs", Encoded)  # revisions before flat Encoded took per-pair arrays
    return make([np.full(n, 1000, dtype=np.int32) for n in lengths.tolist()],
                [np.zeros(n, dtype=np.int32) for n in lengths.tolist()])


def measure(command: str, lengths: str, gpu_us: float, launch_us: float, duration: float, batch: int,
            concurrency: int, tokenizers: int, workers: int = 1, stand_in_tokenizer: int = 0, mode: str = "thread") -> dict:
    """One measurement, in this interpreter, on whichever xbench PYTHONPATH holds."""
    import asyncio
    import functools

    if command == "forward":
        return raw_forward(gpu_us * 1e-6, launch_us * 1e-6, batch, duration)

    import xbench.core.pipeline as pipeline
    from xbench.bench.load import generate
    from xbench.bench.runners import InferTarget, PipelineTarget, load_spec
    from xbench.config import compose_config
    from xbench.core.tokenizer_pool import TokenizerPool
    from xbench.workload import make_workload

    pipeline.create_backend = functools.partial(stand_in_backend, gpu_us * 1e-6, launch_us * 1e-6)
    if stand_in_tokenizer:  # the same processes and traffic, no tokenizing in them
        TokenizerPool.submit = lambda pool, pairs, direction="right": pool._executor.submit(
            stand_in_encode, pairs, direction)
    cfg = compose_config([f"workload.lengths={lengths}", f"experiment.duration_s={duration}",
                          f"experiment.max_duration_s={duration}", "experiment.warmup_s=2",
                          "batching.max_batch_size=256", "batching.max_batch_tokens=65536",
                          f"tokenizer_pool.workers={tokenizers}", "tokenizer_pool.mode=process",
                          f"model_pool.workers={workers}",
                          # revisions before model_pool.mode ran threads, the default on the CPU
                          *([f"model_pool.mode={mode}"] if mode != "thread" else [])])
    target = (InferTarget if command == "infer-bench" else PipelineTarget)(cfg)
    send = target.sender(make_workload(None, cfg), batch)
    spec = load_spec(cfg, concurrency)
    # A first short run loads what the generator and its statistics import lazily (scipy).
    asyncio.run(generate(send, replace(spec, duration_s=1, warmup_s=0, max_duration_s=1, windows=1)))
    cpu_at: list[float] = []  # process CPU time at the first send and at each completion

    async def timed_send(i: int):
        if not cpu_at:
            cpu_at.append(time.process_time())
        sent = await send(i)
        cpu_at.append(time.process_time())
        return sent

    records: list = []
    stats = asyncio.run(generate(timed_send, spec, records=records))
    target.close()
    # CPU from the first request to the last completion (not the statistics after), per pair
    return {"pairs_per_s": stats["summary"]["pairs_per_s"],
            "cpu_us_per_pair": 1e6 * (cpu_at[-1] - cpu_at[0]) / sum(r.pairs for r in records)}


def run_child(tree: Path, cache: Path, *args: str) -> dict:
    """One measurement in a fresh interpreter on `tree`'s xbench, with a cache folder of its own
    (the stand-in's cost-model calibration must not reach the user's cache)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "XBENCH_CACHE": str(cache)}
    done = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed in {tree}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(
    gpu_us: float = typer.Option(8.0, help="Stand-in GPU time per pair, in microseconds (8: ~125k pairs/s)."),
    launch_us: float = typer.Option(0.0, help="Stand-in host time per batch launching its kernels, GIL held "
                                              "(an eager fp16 forward of 128 pairs on an H200 host: ~2,000)."),
    duration: float = typer.Option(8.0, help="Seconds measured per point."),
    rounds: int = typer.Option(3, help="Rounds; each measures every variant once, so drift hits all alike."),
    batch: int = typer.Option(128, help="Pairs per request."),
    concurrency: int = typer.Option(16, help="Closed-loop clients."),
    tokenizers: int = typer.Option(1, help="Tokenizer processes (this machine's cores limit pipeline-bench)."),
    workers: int = typer.Option(1, help="Model workers sharing the one stand-in GPU."),
    modes: str = typer.Option("thread", help="Model pool modes to measure, comma-separated: thread, process."),
    stand_in_tokenizer: bool = typer.Option(False, help="Tokenizer processes hand back ids without tokenizing."),
    against: Optional[str] = typer.Option(None, help="A git revision measured alongside this checkout."),
    out: Path = typer.Option(Path("results/benchmarks/host_overhead.json"), "--out", "-o"),
    child: bool = typer.Option(False, "--child", hidden=True),
    child_args: Optional[list[str]] = typer.Argument(None, hidden=True),
) -> None:
    if child:
        command, lengths, *numbers = child_args or []
        print(json.dumps(measure(command, lengths, *map(float, numbers[:3]), *map(int, numbers[3:8]), *numbers[8:])))
        return
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if bad := [m for m in mode_list if m not in ("thread", "process")]:
        raise typer.BadParameter(f"{', '.join(bad)}: modes are thread and process", param_hint="--modes")
    trees = {"this checkout": ROOT}
    if against:
        worktree = Path(tempfile.mkdtemp(prefix="xbench-against-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(worktree), against],
                       check=True, capture_output=True)
        trees[against] = worktree
    variants = [(f"{name}, {mode}" if len(mode_list) > 1 else name, tree, mode)
                for name, tree in trees.items() for mode in mode_list]
    # The raw forward: the stand-in alone, once a round (it costs the same on either workload).
    points = [("forward", "msmarco")] + [(c, w) for w in ("msmarco", "longtail") for c in ("infer-bench", "pipeline-bench")]
    samples: dict[tuple[str, str, str], list[dict]] = {}
    measurements = itertools.count()  # each in a fresh cache folder, as a first run would be
    try:
        with console.status("measuring ...") as status, tempfile.TemporaryDirectory(prefix="xbench-host-") as caches:
            for r in range(rounds):
                for command, lengths in points:
                    for name, tree, mode in variants if command != "forward" else [("stand-in alone", ROOT, "-")]:
                        status.update(f"round {r + 1}/{rounds}: {command} {lengths} on {name}")
                        samples.setdefault((command, lengths if command != "forward" else "either", name), []).append(
                            run_child(tree, Path(caches) / str(next(measurements)), command, lengths,
                                      str(gpu_us), str(launch_us), str(duration), str(batch), str(concurrency),
                                      str(tokenizers), str(workers), str(int(stand_in_tokenizer)), mode))
    finally:
        if against:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[against])],
                           capture_output=True)
    raw = statistics.fmean(s["pairs_per_s"] for s in samples[("forward", "either", "stand-in alone")])
    table = Table(title=f"Host cost per pair around a stand-in GPU ({gpu_us:g} µs/pair GIL free, {launch_us:g} µs/batch "
                        f"launching with the GIL), batch {batch}, concurrency {concurrency}, {tokenizers} "
                        f"{'stand-in ' if stand_in_tokenizer else ''}tokenizer process(es), {workers} model worker(s), "
                        f"{rounds} alternating rounds")
    for col in ("command", "workload", "code", "pairs/s per round", "main-process CPU µs/pair", "mean pairs/s",
                "÷ stand-in alone"):
        table.add_column(col, justify="right" if "pairs" in col or "µs" in col or "÷" in col else "left")
    rows = []
    for (command, lengths, name), runs in samples.items():
        rate = statistics.fmean(s["pairs_per_s"] for s in runs)
        cpus = [s["cpu_us_per_pair"] for s in runs if s["cpu_us_per_pair"] is not None]
        cpu = statistics.fmean(cpus) if cpus else None
        table.add_row(command, lengths, name, " ".join(f"{s['pairs_per_s']:,.0f}" for s in runs),
                      " ".join(f"{c:.1f}" for c in cpus) or "-", f"{rate:,.0f}", f"{rate / raw:.2f}")
        rows.append({"command": command, "workload": lengths, "code": name, "runs": runs,
                     "mean_pairs_per_s": rate, "mean_cpu_us_per_pair": cpu, "of_stand_in_alone": rate / raw})
    console.print(table)
    from xbench.results.store import environment, write_json

    write_json(out, {"env": environment(), "gpu_us_per_pair": gpu_us, "launch_us_per_batch": launch_us, "batch": batch,
                     "concurrency": concurrency, "tokenizer_processes": tokenizers,
                     "stand_in_tokenizer": stand_in_tokenizer, "model_workers": workers, "modes": mode_list,
                     "against": against, "rows": rows})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
