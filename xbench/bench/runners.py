"""Runners: one target per command, driven by the one load generator over a grid of points.

A target sets up once (loads the model, starts the pools) and then hands out a `send`
coroutine per point. `run_bench` measures every (batch, concurrency) point of
`experiment`, writes one result document per point and returns the documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from xbench.backends.base import normalize
from xbench.bench.load import LoadSpec, Send, Sent, generate
from xbench.bench.stats import Record, goodput, parse_goodput
from xbench.config import to_dict
from xbench.core.model_pool import TokenCounts
from xbench.core.pipeline import Pipeline
from xbench.core.request import RerankJob
from xbench.core.tokenizer_pool import TokenizerPool
from xbench.checkpoints import ResolvedModel, effective_max_length, resolve_instance
from xbench.results.store import (RESULTS_DIR, SCHEMA_VERSION, check_writable, environment, point_filename, run_id,
                                  write_or_keep)
from xbench.workload import Workload, char_profile, length_profile

PRETOKENIZED_REQUESTS = 64  # distinct pre-tokenized requests infer-bench cycles over


class TokenizeTarget:
    """tokenize-bench: the TokenizerPool alone."""

    def __init__(self, cfg: DictConfig):
        inst = cfg.model_pool.instances[0]
        self.model = resolve_instance(inst)
        tp = cfg.tokenizer_pool
        max_length = effective_max_length(self.model, inst.max_length)
        self.pool = TokenizerPool.for_model(self.model.path, max_length, tp, normalize(inst.backend, inst.device)[1],
                                            self.model.recipe)
        self.pool.warmup()
        self.model_info = model_info(self.model)
        self.params = {"tokenizer_workers": self.pool.workers, "parallelism": bool(tp.parallelism),
                       "tokenizer_mode": self.pool.mode, "max_length": max_length}

    def length_profile(self, workload: Workload) -> dict:
        return workload_lengths(self.pool, workload, self.params["max_length"])

    def sender(self, workload: Workload, batch: int) -> Send:
        async def send(i: int) -> Sent:
            enc = await asyncio.wrap_future(self.pool.submit(workload.request(i, batch).pairs))
            return Sent(pairs=len(enc), stages_s={"tokenize": enc.tokenize_s}, tokens=enc.total_tokens)

        return send

    def close(self) -> None:
        self.pool.close()


class PipelineTarget:
    """pipeline-bench: tokenizer pool -> batcher -> model pool, in process."""

    pretokenized = False

    def __init__(self, cfg: DictConfig):
        self.pipeline = Pipeline.from_config(cfg).start()
        self.model_info = model_info(self.pipeline.model)
        d = self.pipeline.describe()
        self.params = {k: d[k] for k in ("backend", "device", "precision", "max_length", "model_workers",
                                         "model_mode", "threads_per_worker", "tokenizer_workers", "tokenizer_mode", "parallelism")}
        b = cfg.batching
        self.params.update(batching=bool(b.enabled), max_batch_size=b.max_batch_size,
                           max_batch_tokens=b.max_batch_tokens, timeout_ms=b.timeout_ms,
                           length_bucketing=bool(b.length_bucketing), planner=b.planner, packed=d["packed"])
        self.engine = {**d["engine"], "batch_cost_model": d["batch_cost_model"]}

    def length_profile(self, workload: Workload) -> dict:
        return workload_lengths(self.pipeline.tokenizers, workload, self.params["max_length"])

    def token_counts(self) -> TokenCounts:
        return self.pipeline.models.token_counts()

    def sender(self, workload: Workload, batch: int) -> Send:
        if self.pretokenized:
            encoded = [self.pipeline.tokenizers.encode(workload.request(i, batch).pairs)
                       for i in range(PRETOKENIZED_REQUESTS)]

            def submit(i: int) -> RerankJob:
                return self.pipeline.submit_encoded(encoded[i % len(encoded)])
        else:
            def submit(i: int) -> RerankJob:
                return self.pipeline.submit(workload.request(i, batch).pairs)

        async def send(i: int) -> Sent:
            res = await submit(i).wait()
            stages = res.stages_s if not self.pretokenized else {"queue": res.stages_s["queue"], "infer": res.stages_s["infer"]}
            return Sent(pairs=len(res.logits), stages_s=stages, tokens=res.total_tokens)

        return send

    def close(self) -> None:
        self.pipeline.close()


class InferTarget(PipelineTarget):
    """infer-bench: batcher + model pool on pre-tokenized requests (the model stage alone)."""

    pretokenized = True

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        for k in ("tokenizer_workers", "tokenizer_mode", "parallelism"):
            self.params.pop(k)


TARGETS: dict[str, Callable[[DictConfig], Any]] = {
    "tokenize-bench": TokenizeTarget,
    "infer-bench": InferTarget,
    "pipeline-bench": PipelineTarget,
}


PROFILE_PAIRS = 4096  # pairs of the workload tokenized to describe its length mix


def workload_lengths(tokenizers: TokenizerPool, workload: Workload, max_length: int) -> dict:
    """The workload's pair lengths in tokens (after truncation): mean, percentiles, histogram."""
    return length_profile(tokenizers.encode(workload.pairs(min(PROFILE_PAIRS, workload.size))).lengths, max_length)


def load_spec(cfg: DictConfig, concurrency: int) -> LoadSpec:
    e = cfg.experiment
    return LoadSpec(concurrency=concurrency, rate=e.rate, duration_s=e.duration_s, warmup_s=e.warmup_s,
                    requests=e.requests, windows=e.windows, min_window_requests=e.min_requests_per_window,
                    stability_pct=e.stability_pct, max_duration_s=e.max_duration_s, seed=e.seed,
                    honour_retry_after=e.honour_retry_after, burstiness=e.burstiness)


def grid(cfg: DictConfig) -> list[tuple[int, int]]:
    """(batch, concurrency) points; open loop ignores concurrency."""
    levels = [1] if cfg.experiment.rate else list(cfg.experiment.concurrency_levels)
    return [(int(b), int(c)) for b in cfg.experiment.batch_sizes for c in levels]


def model_info(model: ResolvedModel) -> dict:
    info = model.info()
    info.pop("path", None)
    return info


def result_document(command: str, cfg: DictConfig, target: Any, params: dict, stats: dict) -> dict:
    params = {**target.params, **params}
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "experiment": cfg.name,
        "config": to_dict(cfg),
        "env": environment(),
        "model": target.model_info,
        "engine": getattr(target, "engine", None),
        "params": params,
        **stats,
    }


@contextlib.contextmanager
def progress_bar(console: Console) -> Iterator[Progress]:
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                  transient=False) as progress:
        yield progress


def output_path(out: Path | None, command: str, params: dict, points: int, run: str) -> Path:
    """-o FILE.json for a single point; otherwise a folder holding one file per point."""
    if out is not None and out.suffix == ".json":
        if points > 1:
            return out.with_name(f"{out.stem}-{point_filename(params)}")
        return out
    folder = out if out is not None else RESULTS_DIR / command / run
    return folder / point_filename(params)


async def measure(target: Any, workload: Workload, batch: int, spec: LoadSpec,
                  progress: Callable[[float], None] | None = None, measured: list[Record] | None = None) -> dict:
    """One point: the target's send under the load generator (opening its session, if any), or
    a target that runs several generators and merges them; the requests its statistics count are
    appended to `measured` (one generator only)."""
    if hasattr(target, "generate"):
        return await target.generate(workload, batch, spec, progress)
    if hasattr(target, "open"):
        await target.open()
    try:
        return await generate(target.sender(workload, batch), spec, progress, measured=measured)
    finally:
        if hasattr(target, "aclose"):
            await target.aclose()


def run_points(command: str, cfg: DictConfig, target: Any, workload: Workload,
               points: list[tuple[int, int, float | None]], out: Path | None, console: Console,
               annotate: Callable[[dict], None] | None = None, write: bool = True,
               records: Path | None = None, schedule: list[float] | None = None) -> list[dict]:
    """Measure (batch, concurrency, rate) points against a ready target; write one document each
    (after `annotate` has added what the caller concludes from it), unless `write` is off, and
    with `records` one JSONL line per measured request."""
    run = run_id()
    if write:
        check_writable(output_path(out, command, {}, len(points), run).parent)  # before anything is measured
    docs = []
    lengths = target.length_profile(workload) if hasattr(target, "length_profile") else None
    chars = char_profile(workload) if lengths is None else None
    with progress_bar(console) as progress:
        for batch, concurrency, rate in points:
            load = "trace" if schedule else f"rate {rate:g}/s" if rate else f"concurrency {concurrency}"
            task = progress.add_task(f"{command} batch {batch} {load}", total=1.0)
            spec = load_spec(cfg, concurrency)
            spec.rate, spec.schedule = rate, schedule
            before = target.token_counts() if hasattr(target, "token_counts") else None
            started = time.time()
            measured: list[Record] = []
            stats = asyncio.run(measure(target, workload, batch, spec, lambda f, t=task: progress.update(t, completed=f),
                                        measured))
            if cfg.experiment.goodput and measured:
                stats["goodput"] = goodput(measured, parse_goodput(cfg.experiment.goodput), stats["summary"]["duration_s"])
            if records is not None:
                write_records(records, measured, batch, concurrency, rate)
            stats["load"].update(started_at=started, ended_at=time.time())  # wall clock: points from many nodes line up
            if before is not None:  # warm-up included: the same pairs' mix, so the same ratio
                stats["padding"] = target.token_counts().since(before)
            params = {"batch": batch, "concurrency": None if rate or schedule else concurrency, "rate": rate,
                      "workload": workload.source}
            doc = result_document(command, cfg, target, params, stats)
            doc["workload"] = {"source": workload.source, **({"sha256": workload.sha256} if workload.sha256 else {}),
                               **({"pair_tokens": lengths} if lengths is not None else {"pair_chars": chars})}
            doc["workload"].update(sent_profile(measured, workload))
            if annotate:
                annotate(doc)
            if write:
                doc["_path"] = str(write_or_keep(output_path(out, command, doc["params"], len(points), run), doc))
            docs.append(doc)
    return docs


def sent_profile(measured: list[Record], workload: Workload) -> dict:
    """What was actually sent, beside what was asked for: documents per request (when drawn from a
    distribution) and the tokens per document the server counted (its x-compute-tokens)."""
    def described(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), **{f"p{q}": float(np.percentile(values, q)) for q in (1, 50, 99)},
                "min": min(values), "max": max(values)}

    out = {}
    per_doc = [r.tokens / r.documents for r in measured if r.ok and r.tokens and r.documents]
    if per_doc:
        out["tokens_per_document"] = described(per_doc)
    sent = [r.documents or r.pairs for r in measured if r.documents or r.pairs]
    if workload.sizes is not None and sent:
        out["docs_per_request"] = {"spec": workload.sizes.spec, **described(sent)}
    return out


def write_records(path: Path, measured: list[Record], batch: int, concurrency: int, rate: float | None) -> Path:
    """One line per measured request (times from the point's first send, the point it belongs
    to), added to `path`, so a run of several points leaves one file: JSON lines, or a Parquet
    table for a `.parquet` path (with pyarrow)."""
    import json

    origin = min((r.start for r in measured), default=0.0)
    point = {"batch": batch, "concurrency": None if rate else concurrency, "rate": rate}
    lines = [{"point": point, **r.line(origin)} for r in sorted(measured, key=lambda r: r.start)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{**line, "point": json.dumps(line["point"])} for line in lines]
        if path.is_file() and path.stat().st_size:
            rows = pq.read_table(path).to_pylist() + rows
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    with path.open("a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return path


def run_bench(command: str, cfg: DictConfig, workload: Workload, out: Path | None = None,
              console: Console | None = None, target: Any = None, write: bool = True) -> list[dict]:
    console = console or Console(stderr=True)
    if target is None:
        with console.status(f"[bold]{command}[/]: loading {cfg.model_pool.instances[0].name} ..."):
            target = TARGETS[command](cfg)
    points = [(b, c, cfg.experiment.rate) for b, c in grid(cfg)]
    try:
        return run_points(command, cfg, target, workload, points, out, console, write=write)
    finally:
        target.close()
