"""Load from several generators: `xbench load URL --generators N [--ray ADDRESS]`.

One Python process can send only so many requests; past that, the generator, not the server, is
measured. N generator processes (local processes, or Ray actors spread over a cluster) share the
schedule: closed loop splits the concurrency, open loop the rate (each part its own seeded
Poisson stream). They pass a common start, run the one load generator (bench/load.py) for the
same fixed duration, and send back what merges exactly: HdrHistograms of latency and stage
times, status and error counts, and completions per time bin. The driver merges them into one
result document, with each part's own figures under `generators`.

A fleet measures for a fixed duration: its parts cannot agree to stop at convergence without
talking mid-run, so the stability verdict is computed afterwards on the merged windows.
"""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from xbench.bench.http import HttpTarget
from xbench.bench.load import LoadSpec, StopLoad, generate
from xbench.bench.stats import (CONFIDENCE, PERCENTILES, Record, even_edges, latency_summary, percentile_interval,
                                rate_interval, stability_block)
from xbench.errors import ConfigError, require
from xbench.workload import Workload

LATENCY_US = (1, 3_600_000_000)  # HdrHistogram range: 1 µs to an hour, 3 significant digits
SIGNIFICANT_DIGITS = 3
BIN_S = 0.1  # completions are counted in bins this wide, merged, then cut into windows
START_MARGIN_S = 1.0  # from "every part is ready" to the common start


def histogram(values_s: list[float]) -> Any:
    from hdrh.histogram import HdrHistogram

    h = HdrHistogram(*LATENCY_US, SIGNIFICANT_DIGITS)
    for v in values_s:
        h.record_value(min(max(int(v * 1e6), LATENCY_US[0]), LATENCY_US[1]))
    return h


def encode(h: Any) -> str:
    return base64.b64encode(h.encode()).decode() if h.get_total_count() else ""


def decode_sum(encoded: list[str]) -> Any:
    """The sum of encoded histograms (an empty one when there are none)."""
    from hdrh.histogram import HdrHistogram

    total = HdrHistogram(*LATENCY_US, SIGNIFICANT_DIGITS)
    for e in encoded:
        if e:
            total.add(HdrHistogram.decode(base64.b64decode(e)))
    return total


def histogram_values_s(h: Any) -> np.ndarray:
    """The recorded values (at the histogram's resolution), for the percentile intervals."""
    steps = [(i.value_iterated_to, i.count_added_in_this_iter_step) for i in h.get_recorded_iterator()]
    if not steps:
        return np.zeros(0)
    values, counts = zip(*steps)
    return np.repeat(np.asarray(values, dtype=np.float64) / 1e6, counts)


def split(spec: LoadSpec, n: int) -> list[LoadSpec]:
    """Each part's share of the schedule, all for the same fixed duration."""
    if n < 1:
        raise ConfigError(f"--generators {n}: must be at least 1")
    if spec.requests is not None:
        raise ConfigError("--generators measures for a duration; drop --requests")
    fixed = {"max_duration_s": spec.duration_s}
    if spec.rate:
        return [replace(spec, rate=spec.rate / n, seed=spec.seed + i, **fixed) for i in range(n)]
    if spec.concurrency < n:
        raise ConfigError(f"--generators {n} is more than --concurrency {spec.concurrency}: each generator needs a client")
    shares = [spec.concurrency // n + (i < spec.concurrency % n) for i in range(n)]
    return [replace(spec, concurrency=c, seed=spec.seed + i, **fixed) for i, c in enumerate(shares)]


def run_part(target_args: dict, workload: Workload, batch: int, spec: LoadSpec, start_at: float) -> dict:
    """One generator: wait for the common start, run the load, return what merges."""
    target = HttpTarget(**target_args)
    target.checked = True  # the driver checked the endpoint once

    async def go() -> tuple[dict, list[Record], float]:
        await target.open()
        try:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            wall = time.time() - time.perf_counter()  # this process's clock -> wall time
            measured: list[Record] = []
            stats = await generate(target.sender(workload, batch), spec, measured=measured)
            return stats, measured, wall
        finally:
            await target.aclose()

    try:
        stats, measured, wall = asyncio.run(go())
    except StopLoad as exc:
        return {"stopped": str(exc)}
    ok = [r for r in measured if r.ok]
    origin = start_at + spec.warmup_s
    bins = np.zeros(int(np.ceil(spec.duration_s / BIN_S)) + 1)
    for r in ok:
        k = int((r.end + wall - origin) / BIN_S)
        bins[min(max(k, 0), len(bins) - 1)] += r.pairs
    stages = sorted({k for r in ok for k in r.stages_s})
    return {
        "host": platform.node(), "pid": os.getpid(), "load": stats["load"], "summary": stats["summary"],
        "latency_ms": stats["latency_ms"], "latency": encode(histogram([r.latency_s for r in ok])),
        "stages": {s: encode(histogram([r.stages_s[s] for r in ok if s in r.stages_s])) for s in stages},
        "http_status": stats.get("http_status", {}), "error_samples": stats.get("error_samples", {}),
        "bins": bins.tolist(),
    }


def merge(parts: list[dict], spec: LoadSpec) -> dict:
    """One result's statistics blocks from the parts' histograms, counts and completion bins."""
    latency = decode_sum([p["latency"] for p in parts])
    duration = max(p["load"]["measured_s"] for p in parts)
    requests = sum(p["summary"]["requests"] for p in parts)
    pairs = sum(p["summary"]["pairs"] for p in parts)
    tokens = sum(p["summary"]["tokens_per_s"] * p["summary"]["duration_s"] for p in parts)
    width = max(len(p["bins"]) for p in parts)
    bins = np.sum([np.pad(p["bins"], (0, width - len(p["bins"]))) for p in parts], axis=0)
    # Windows over the merged completions: the bins in `spec.windows` equal runs (the last bin
    # holds the few that finished after the duration).
    edges = even_edges(0, width, spec.windows)
    cuts = [round(e) for e in edges]
    rates = [float(bins[a:b].sum()) / ((b - a) * BIN_S) for a, b in zip(cuts, cuts[1:]) if b > a]
    values = histogram_values_s(latency)  # percentiles as one generator computes them (linear interpolation)
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for p in parts:
        statuses.update(p["http_status"])
        errors.update(p["error_samples"])
    stage_names = sorted({s for p in parts for s in p["stages"]})
    return {
        "summary": {
            "requests": requests, "pairs": pairs, "errors": sum(p["summary"]["errors"] for p in parts),
            "duration_s": duration, "requests_per_s": requests / duration, "pairs_per_s": pairs / duration,
            "tokens_per_s": tokens / duration,
        },
        "latency_ms": latency_summary(values),
        "stages_ms": {s: latency_summary(histogram_values_s(decode_sum([p["stages"].get(s, "") for p in parts])))
                      for s in stage_names},
        "confidence": {
            "level": CONFIDENCE,
            "pairs_per_s": rate_interval(rates, [1.0] * len(rates)),
            "pairs_per_s_method": "Student t over the merged windows",
            "latency_ms": {k: percentile_interval(values, PERCENTILES[k]) for k in ("p50", "p99")},
            "latency_method": "order statistics (distribution-free, binomial), from the merged HdrHistogram",
        },
        "stability": {**stability_block(rates, "pairs_per_s"), "windows": len(rates), "pairs_per_s_by_window": rates,
                      "ended": "fixed duration (several generators)"},
        **({"http_status": dict(statuses)} if statuses else {}),
        **({"error_samples": dict(errors.most_common(5))} if errors else {}),
        "load": {**parts[0]["load"], "generators": len(parts),
                 **({"concurrency": spec.concurrency} if not spec.rate else
                    {"target_rate": spec.rate,
                     "achieved_send_rate": sum(p["load"]["achieved_send_rate"] for p in parts)})},
        "generators": [{"host": p["host"], "pid": p["pid"], "load": p["load"], "summary": p["summary"],
                        "latency_ms": p["latency_ms"]} for p in parts],
    }


class GeneratorFleet:
    """`xbench load` with several generators: the HTTP target's figures, measured by N processes."""

    def __init__(self, target: HttpTarget, generators: int, ray_address: str | None = None):
        # hdrh merges the parts' latencies; checked here, not in the spawned processes (a traceback per process)
        require(f"--generators {generators}", ("hdrh", "ray") if ray_address else ("hdrh",), "pip install 'xbench[ray]'")
        self.target, self.generators, self.ray_address = target, generators, ray_address
        self.params = {**target.params, "generators": generators, "launcher": "ray" if ray_address else "processes"}
        self.model_info, self.engine, self.url = target.model_info, None, target.url
        self.target_args = {"url": target.url, "api": target.api.name, "model": target.model,
                            "api_key": target.headers.get("authorization", "").removeprefix("Bearer ") or None,
                            "timeout_s": target.timeout_s}

    async def generate(self, workload: Workload, batch: int, spec: LoadSpec,
                       progress: Callable[[float], None] | None = None) -> dict:
        await self.target.open()  # the pre-flight check, once
        await self.target.aclose()
        specs = split(spec, self.generators)
        run = self._on_ray if self.ray_address else self._on_processes
        task = asyncio.get_running_loop().run_in_executor(None, run, workload, batch, specs)
        begin = time.perf_counter()
        while not task.done():
            if progress:
                progress(min(0.99, (time.perf_counter() - begin) / (spec.warmup_s + spec.duration_s + 2 * START_MARGIN_S)))
            await asyncio.sleep(0.2)
        parts = await task
        if stopped := [p["stopped"] for p in parts if "stopped" in p]:
            raise StopLoad(stopped[0])
        return merge(parts, spec)

    def _on_processes(self, workload: Workload, batch: int, specs: list[LoadSpec]) -> list[dict]:
        import multiprocessing

        with ProcessPoolExecutor(len(specs), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_import_generator) as pool:
            list(pool.map(time.sleep, [0.3] * len(specs)))  # every process started and imported
            start_at = time.time() + START_MARGIN_S
            return list(pool.map(run_part, *zip(*[(self.target_args, workload, batch, s, start_at) for s in specs])))

    def _on_ray(self, workload: Workload, batch: int, specs: list[LoadSpec]) -> list[dict]:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.ray_address, log_to_driver=False, include_dashboard=False)
        actor = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_RayGenerator)
        generators = [actor.remote() for _ in specs]
        try:
            ray.get([g.ready.remote() for g in generators])
            start_at = time.time() + START_MARGIN_S
            return ray.get([g.run.remote(self.target_args, workload, batch, s, start_at)
                            for g, s in zip(generators, specs)])
        finally:
            for g in generators:
                ray.kill(g)


def _import_generator() -> None:
    import hdrh.histogram  # noqa: F401  (imported before the common start, not during it)


class _RayGenerator:
    """A generator process on a Ray node."""

    def ready(self) -> str:
        _import_generator()
        return platform.node()

    def run(self, target_args: dict, workload: Workload, batch: int, spec: LoadSpec, start_at: float) -> dict:
        return run_part(target_args, workload, batch, spec, start_at)
