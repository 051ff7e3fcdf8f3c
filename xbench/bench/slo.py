"""Capacity search: the highest open-loop rate whose latency percentile stays under a bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console

from xbench.bench.runners import run_points
from xbench.errors import ConfigError
from xbench.workload import Workload

SEARCH_STEPS = 5


def parse_slo(text: str) -> tuple[str, float]:
    """`p99_ms=500` -> ("p99", 500.0)."""
    key, _, value = text.partition("=")
    metric = key.removesuffix("_ms")
    if metric not in ("p50", "p90", "p95", "p99", "p99_9", "mean", "max") or not value:
        raise ConfigError(f"--slo {text!r}: expected METRIC_ms=N with METRIC one of p50, p90, p95, p99, p99_9, mean, max")
    try:
        bound = float(value)
    except ValueError:
        raise ConfigError(f"--slo {text!r}: {value!r} is not a number of milliseconds") from None
    if bound <= 0:
        raise ConfigError(f"--slo {text!r}: the bound must be positive")
    return metric, bound


def slo_search(command: str, cfg: DictConfig, target: Any, workload: Workload, batch: int, slo: str,
               out: Path | None, console: Console) -> tuple[list[dict], float | None]:
    """Measure closed-loop capacity, then bisect open-loop rates below it. Returns every
    measured document and the highest rate that met the bound with no errors (None if none did)."""
    metric, bound = parse_slo(slo)
    concurrency = int(cfg.experiment.concurrency_levels[0])
    docs = run_points(command, cfg, target, workload, [(batch, concurrency, None)], out, console)
    capacity = docs[0]["summary"]["requests_per_s"]
    if capacity <= 0:
        return docs, None

    def meets(doc: dict) -> bool:
        value = doc["latency_ms"].get(metric)
        return value is not None and value <= bound and doc["summary"]["errors"] == 0

    lo, hi, best = 0.0, capacity * 1.1, None
    for _ in range(SEARCH_STEPS):
        rate = round((lo + hi) / 2, 3) if best is not None or lo > 0 else round(capacity * 0.5, 3)
        doc = run_points(command, cfg, target, workload, [(batch, concurrency, rate)], out, console)[0]
        doc["slo"] = {"metric": metric, "bound_ms": bound, "met": meets(doc)}
        docs.append(doc)
        if meets(doc):
            lo, best = rate, rate
        else:
            hi = rate
    return docs, best
