"""Capacity search: the highest open-loop rate whose latency percentile stays under a bound, or
whose goodput share stays above one.

`xbench load --slo p99_ms=500` (or `--slo goodput=0.99 --goodput "latency_ms<=500,queue_ms<=100"`:
at least 99% of requests meet every bound at once) measures the closed-loop capacity, then searches open-loop rates
(`search_rate`): it brackets downward from half the capacity, halving until a rate meets the
bound (or the rate falls below 1/64 of capacity: no rate meets it), then bisects between the
highest rate that met the bound and the lowest above it that did not, until the two are within
`resolution` of each other. A noisy boundary cannot make it loop: every probe narrows the
bracket, and the answer is the highest rate that was measured to meet the bound. Every probe's
result file carries the verdict (`slo`: the bound, whether this point met it, the rates tried
and the answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig
from rich.console import Console

from xbench.bench.runners import run_points
from xbench.errors import ConfigError
from xbench.results.store import write_or_keep
from xbench.workload import Workload

RESOLUTION = 0.05  # stop when the bracket is within 5% of its upper end
LOWEST_FRACTION = 1 / 64  # of capacity: below this, no rate meets the bound
CEILING = 1.1  # of capacity: open loop past the closed-loop capacity only queues
MAX_PROBES = 12


def parse_slo(text: str) -> tuple[str, float]:
    """`p99_ms=500` -> ("p99", 500.0); `goodput=0.99` -> ("goodput", 0.99)."""
    key, _, value = text.partition("=")
    if key == "goodput":
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ConfigError(f"--slo {text!r}: goodput=F needs a share F in (0, 1], e.g. goodput=0.99")
        return "goodput", share
    metric = key.removesuffix("_ms")
    if metric not in ("p50", "p90", "p95", "p99", "p99_9", "mean", "max") or not value:
        raise ConfigError(f"--slo {text!r}: expected METRIC_ms=N with METRIC one of p50, p90, p95, p99, p99_9, mean, "
                          f"max, or goodput=F (with --goodput)")
    try:
        bound = float(value)
    except ValueError:
        raise ConfigError(f"--slo {text!r}: {value!r} is not a number of milliseconds") from None
    if bound <= 0:
        raise ConfigError(f"--slo {text!r}: the bound must be positive")
    return metric, bound


@dataclass
class RateSearch:
    best: float | None = None  # the highest rate measured to meet the bound
    tried: list[tuple[float, bool]] = field(default_factory=list)  # (rate, met), in probe order


def search_rate(meets: Callable[[float], bool], capacity: float, resolution: float = RESOLUTION,
                max_probes: int = MAX_PROBES) -> RateSearch:
    """Bracket downward from capacity / 2, then bisect; `meets(rate)` measures one rate."""
    search = RateSearch()

    def probe(rate: float) -> bool:
        met = meets(rate)
        search.tried.append((rate, met))
        if met and (search.best is None or rate > search.best):
            search.best = rate
        return met

    lo, hi = 0.0, capacity * CEILING  # lo met the bound (0: none yet); hi is above the answer
    rate = capacity / 2
    while len(search.tried) < max_probes:
        if probe(rate):
            lo = rate
            break
        hi = rate
        rate /= 2
        if rate < capacity * LOWEST_FRACTION:
            return search  # no rate meets the bound
    while len(search.tried) < max_probes and lo and (hi - lo) > resolution * hi:
        rate = (lo + hi) / 2
        if probe(rate):
            lo = rate
        else:
            hi = rate
    return search


def slo_search(command: str, cfg: DictConfig, target: Any, workload: Workload, batch: int, slo: str,
               out: Path | None, console: Console) -> tuple[list[dict], RateSearch]:
    """Measure closed-loop capacity, then search open-loop rates below it. Returns every
    measured document and the search (its `best` is None when no rate met the bound)."""
    metric, bound = parse_slo(slo)
    if metric == "goodput" and not cfg.experiment.goodput:
        raise ConfigError(f"--slo {slo}: give the bounds a good request meets with --goodput, "
                          f"e.g. --goodput \"latency_ms<=500\"")
    bound_key = "bound" if metric == "goodput" else "bound_ms"  # a share, or milliseconds
    concurrency = int(cfg.experiment.concurrency_levels[0])
    docs = run_points(command, cfg, target, workload, [(batch, concurrency, None)], out, console)
    capacity = docs[0]["summary"]["requests_per_s"]
    if capacity <= 0:
        return docs, RateSearch()

    def verdict(doc: dict) -> bool:
        if metric == "goodput":
            return doc.get("goodput", {}).get("fraction", 0.0) >= bound
        value = doc["latency_ms"].get(metric)
        return value is not None and value <= bound and doc["summary"]["errors"] == 0

    def meets(rate: float) -> bool:
        def annotate(doc: dict) -> None:
            doc["slo"] = {"metric": metric, bound_key: bound, "met": verdict(doc)}

        doc = run_points(command, cfg, target, workload, [(batch, concurrency, round(rate, 3))], out, console,
                         annotate=annotate)[0]
        docs.append(doc)
        return doc["slo"]["met"]

    search = search_rate(meets, capacity)
    # Every file of the search carries its outcome: the rates tried and the answer.
    outcome = {"best_rate": search.best, "capacity": capacity,
               "tried": [{"rate": round(r, 3), "met": m} for r, m in search.tried]}
    for doc in docs:
        doc["slo"] = {"metric": metric, bound_key: bound, **doc.get("slo", {"met": None}), **outcome}
        write_or_keep(Path(doc["_path"]), {k: v for k, v in doc.items() if k != "_path"})
    return docs, search
