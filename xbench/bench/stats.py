"""Statistics of one measured point: throughput, latency percentiles, stages, stability, and
95% confidence intervals (pairs/s: Student t over the measurement windows; p50/p99: the
distribution-free order-statistic interval).

The one place where numbers are computed from raw request records, for every command.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from xbench.errors import ConfigError

PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "p99_9": 99.9}
STABILITY_WINDOWS = 3  # perf_analyzer's rule: the last 3 windows ...
STABILITY_TOLERANCE = 0.10  # ... within 10% of their mean (experiment.stability_pct)


@dataclass
class Record:
    """One finished request. Times are perf_counter seconds."""

    start: float  # when it was sent (closed loop) or scheduled (open loop)
    end: float
    pairs: int
    ok: bool = True
    stages_s: dict[str, float] = field(default_factory=dict)
    status: int | None = None  # HTTP status, for `load`
    error: str | None = None
    tokens: int = 0
    retry_after_s: float | None = None  # a shed answer's Retry-After
    documents: int = 0  # documents the request carried (`load`), scored or not
    sent: float | None = None  # when it was actually sent (open loop: `start` is when it was due)

    @property
    def latency_s(self) -> float:
        return self.end - self.start

    def metrics_ms(self) -> dict[str, float]:
        """What a goodput bound or a record line reads: latency, each server stage, and the rest
        (client, network and everything the stages do not cover), in milliseconds."""
        out = {"latency_ms": self.latency_s * 1000}
        if self.stages_s:
            out.update({f"{k}_ms": v * 1000 for k, v in self.stages_s.items()})
            if self.status is not None:  # over HTTP
                out["rest_ms"] = max(0.0, self.latency_s - sum(self.stages_s.values())) * 1000
        return out

    @classmethod
    def from_line(cls, line: dict) -> "Record":
        """A `--records` line back as a record (times from the run's start)."""
        stages = {k[:-3]: v / 1000 for k, v in line.items()
                  if k.endswith("_ms") and k not in ("latency_ms", "rest_ms") and isinstance(v, (int, float))}
        return cls(float(line["start_s"]), float(line["end_s"]), int(line.get("pairs", 0)), ok=bool(line.get("ok")),
                   stages_s=stages, status=line.get("status"), error=line.get("error"),
                   tokens=int(line.get("tokens", 0)), documents=int(line.get("documents", 0)))

    def line(self, origin: float) -> dict:
        """One line of `--records`: times in seconds from the run's start."""
        return {"start_s": round(self.start - origin, 6), "end_s": round(self.end - origin, 6), "ok": self.ok,
                "status": self.status, "documents": self.documents or self.pairs, "pairs": self.pairs,
                "tokens": self.tokens,
                **{k: round(v, 3) for k, v in self.metrics_ms().items()},
                **({"error": self.error} if self.error else {})}


def latency_summary(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p95, p99, p99.9, max in milliseconds (linear interpolation)."""
    keys = ["mean", *PERCENTILES, "max"]
    if len(values_s) == 0:
        return {k: None for k in keys}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {"mean": float(ms.mean())}
    out.update({k: float(np.percentile(ms, q)) for k, q in PERCENTILES.items()})
    out["max"] = float(ms.max())
    return out


def even_edges(t0: float, t1: float, windows: int) -> list[float]:
    """Boundaries of `windows` equal slices of [t0, t1], the last exactly t1 (t0 + (t1 - t0) may
    round past or short of it, dropping the request that ends the interval)."""
    return [t0 + (t1 - t0) * k / windows for k in range(windows)] + [t1]


def window_rates(ends: Iterable[float], counts: Iterable[int], edges: Sequence[float]) -> list[float]:
    """Throughput (count per second) in each window between consecutive `edges`, by completion
    time; completions outside [edges[0], edges[-1]] are not counted."""
    bounds = np.asarray(edges, dtype=np.float64)
    totals = np.zeros(len(bounds) - 1)
    for end, n in zip(ends, counts):
        k = int(np.searchsorted(bounds, end, side="right")) - 1
        if 0 <= k < len(totals) or end == bounds[-1]:
            totals[min(k, len(totals) - 1)] += n
    widths = np.diff(bounds)
    return [float(t / w) if w > 0 else 0.0 for t, w in zip(totals, widths)]


CONFIDENCE = 0.95


def rate_interval(rates: Sequence[float], widths: Sequence[float], level: float = CONFIDENCE) -> list[float] | None:
    """Student-t interval of the overall rate from windows of unequal width: the width-weighted
    mean of the windows' rates (= total / time) with the ratio estimator's standard error.
    None under 2 windows."""
    from scipy.stats import t

    r, w = np.asarray(rates, dtype=np.float64), np.asarray(widths, dtype=np.float64)
    n = len(r)
    if n < 2 or w.sum() <= 0:
        return None
    mean = float((w * r).sum() / w.sum())
    se = float(np.sqrt(n / (n - 1) * (w ** 2 * (r - mean) ** 2).sum()) / w.sum())
    half = float(t.ppf(0.5 + level / 2, n - 1)) * se
    return [mean - half, mean + half]


def percentile_interval(values_s: Sequence[float], q: float, level: float = CONFIDENCE) -> list[float | None] | None:
    """Distribution-free interval of the q-th percentile, in ms: the order statistics whose ranks
    the binomial distribution of "how many fall below it" bounds. A bound the sample cannot give
    (p99 of fewer than ~370 requests has no upper one) is None: unknown, not the sample's max,
    which a bootstrap would wrongly report. None under 2 values."""
    from scipy.stats import binom

    x = np.sort(np.asarray(values_s, dtype=np.float64)) * 1000.0
    n = len(x)
    if n < 2:
        return None
    p = q / 100
    low_rank = int(binom.ppf((1 - level) / 2, n, p))  # X_(low_rank) <= the percentile <= X_(high_rank)
    high_rank = int(binom.ppf(1 - (1 - level) / 2, n, p)) + 1
    return [float(x[low_rank - 1]) if low_rank >= 1 else None, float(x[high_rank - 1]) if high_rank <= n else None]


def spread(values: Sequence[float]) -> float | None:
    """Largest relative distance of the last STABILITY_WINDOWS values from their mean."""
    last = np.asarray(list(values)[-STABILITY_WINDOWS:], dtype=np.float64)
    if len(last) < STABILITY_WINDOWS or last.mean() <= 0:
        return None
    return float(np.abs(last - last.mean()).max() / last.mean())


def is_stable(values: Sequence[float], tolerance: float = STABILITY_TOLERANCE) -> bool:
    s = spread(values)
    return s is not None and s <= tolerance


def stability_block(values: Sequence[float], metric: str, tolerance: float = STABILITY_TOLERANCE, **extra) -> dict:
    """The result document's verdict on the windows' `values` of `metric`."""
    s = spread(values)
    return {
        "metric": metric,
        "by_window": [float(v) for v in values],
        "stable": s is not None and s <= tolerance,
        "spread_pct": None if s is None else 100 * s,
        "rule": f"last {STABILITY_WINDOWS} windows' {metric} within {tolerance:.0%} of their mean",
        **extra,
    }


def summarize(records: Sequence[Record], edges: Sequence[float]) -> dict:
    """The summary, latency_ms, stages_ms, confidence and stability blocks of a result document,
    from the records that completed inside the measurement interval [edges[0], edges[-1]],
    whose windows lie between consecutive edges."""
    t0, t1 = edges[0], edges[-1]
    measured = [r for r in records if t0 <= r.end <= t1]
    ok = [r for r in measured if r.ok]
    duration = max(t1 - t0, 1e-9)
    pairs = sum(r.pairs for r in ok)
    stage_names = sorted({k for r in ok for k in r.stages_s})
    # Over HTTP, what the server's timing headers leave out: the client, the network, the parsing.
    rest = [r.metrics_ms()["rest_ms"] / 1000 for r in ok if r.stages_s and r.status is not None]
    rates = window_rates([r.end for r in ok], [r.pairs for r in ok], edges)
    statuses = Counter(str(r.status) for r in measured if r.status is not None)
    shed = statuses.get("429", 0)
    errors = Counter(r.error for r in measured if not r.ok and r.error)
    return {
        "summary": {
            "requests": len(ok),
            "pairs": pairs,
            "errors": len(measured) - len(ok),
            "duration_s": duration,
            "requests_per_s": len(ok) / duration,
            "pairs_per_s": pairs / duration,
            "tokens_per_s": sum(r.tokens for r in ok) / duration,
            **({"shed": shed, "shed_fraction": shed / len(measured) if measured else 0.0} if statuses else {}),
        },
        "latency_ms": latency_summary([r.latency_s for r in ok]),
        "stages_ms": {**{s: latency_summary([r.stages_s[s] for r in ok if s in r.stages_s]) for s in stage_names},
                      **({"rest": latency_summary(rest)} if rest else {})},
        "confidence": {
            "level": CONFIDENCE,
            "pairs_per_s": rate_interval(rates, np.diff(edges)),
            "pairs_per_s_method": "Student t over the measurement windows (ratio estimator)",
            "latency_ms": {k: percentile_interval([r.latency_s for r in ok], PERCENTILES[k]) for k in ("p50", "p99")},
            "latency_method": "order statistics (distribution-free, binomial); null: a bound the sample cannot give",
        },
        "stability": {
            **stability_block(rates, "pairs_per_s"),
            "windows": len(rates),
            "window_s": [float(w) for w in np.diff(edges)],
            "pairs_per_s_by_window": rates,
        },
        **({"http_status": dict(statuses)} if statuses else {}),
        **({"error_samples": dict(errors.most_common(5))} if errors else {}),
    }


GOODPUT_METRICS = ("latency_ms", "queue_ms", "tokenize_ms", "infer_ms", "rest_ms")


def parse_goodput(text: str) -> dict[str, float]:
    """'latency_ms<=500,queue_ms<=100' -> {'latency_ms': 500.0, 'queue_ms': 100.0}: bounds every
    request must meet at once to count as good."""
    bounds = {}
    for clause in filter(None, (c.strip() for c in text.split(","))):
        metric, sep, value = clause.partition("<=")
        metric = metric.strip()
        try:
            bound = float(value)
        except ValueError:
            bound = -1.0
        if not sep or metric not in GOODPUT_METRICS or bound < 0:
            raise ConfigError(f"--goodput clause {clause!r}: write METRIC<=MILLISECONDS with METRIC one of "
                              f"{', '.join(GOODPUT_METRICS)} (each request's own; a percentile is not a request's)")
        bounds[metric] = bound
    if not bounds:
        raise ConfigError(f"--goodput {text!r}: no bound given, e.g. latency_ms<=500,queue_ms<=100")
    return bounds


def goodput(records: Sequence[Record], bounds: dict[str, float], duration_s: float) -> dict:
    """The requests that succeeded and met every bound: their rate and share. A bound on a stage
    the server did not report is not met (it cannot be shown to be)."""
    good = sum(1 for r in records if r.ok and all(r.metrics_ms().get(k, float("inf")) <= v for k, v in bounds.items()))
    return {"bounds": bounds, "good": good, "requests": len(records),
            "requests_per_s": good / duration_s if duration_s > 0 else 0.0,
            "fraction": good / len(records) if records else 0.0}


def rebuild(lines: Sequence[dict], windows: int = 5) -> list[dict]:
    """Result blocks (summary, latency, stages, intervals) recomputed from `--records` lines, one
    per point the lines name (a run of several points tags each line with its `point`)."""
    points: dict[str, list[dict]] = {}
    for line in lines:
        points.setdefault(json.dumps(line.get("point") or {}, sort_keys=True), []).append(line)
    out = []
    for key, group in points.items():
        records = [Record.from_line(line) for line in group]
        edges = even_edges(min(r.start for r in records), max(r.end for r in records), windows)
        out.append({"point": json.loads(key), **summarize(records, edges)})
    return out
