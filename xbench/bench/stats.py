"""Statistics of one measured point: throughput, latency percentiles, stages, stability, and
95% confidence intervals (pairs/s: Student t over the windows' rates; p50/p99: bootstrap over
requests).

The one place where numbers are computed from raw request records, for every command.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "p99_9": 99.9}
STABILITY_WINDOWS = 3  # perf_analyzer's rule: the last 3 windows ...
STABILITY_TOLERANCE = 0.10  # ... within 10% of their mean


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

    @property
    def latency_s(self) -> float:
        return self.end - self.start


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


def window_rates(ends: Iterable[float], counts: Iterable[int], t0: float, t1: float, windows: int) -> list[float]:
    """Throughput (count per second) in `windows` equal slices of [t0, t1], by completion time."""
    width = (t1 - t0) / windows
    totals = [0.0] * windows
    for end, n in zip(ends, counts):
        k = min(int((end - t0) / width), windows - 1) if width > 0 else 0
        totals[k] += n
    return [t / width if width > 0 else 0.0 for t in totals]


CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CELLS = 20_000_000  # resamples x requests: fewer resamples for very long runs


def mean_interval(values: Sequence[float], level: float = CONFIDENCE) -> list[float] | None:
    """Student-t interval of the mean of `values` (the windows' rates); None under 2 values."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return None
    half = float(t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return [float(x.mean()) - half, float(x.mean()) + half]


def percentile_interval(values_s: Sequence[float], q: float, level: float = CONFIDENCE,
                        seed: int = 0) -> list[float] | None:
    """Bootstrap interval (percentile method, seeded) of the q-th percentile, in ms; None under
    2 values."""
    x = np.asarray(values_s, dtype=np.float64) * 1000.0
    if len(x) < 2:
        return None
    resamples = max(100, min(BOOTSTRAP_RESAMPLES, BOOTSTRAP_CELLS // len(x)))
    rng = np.random.default_rng(seed)
    stats = np.percentile(x[rng.integers(0, len(x), (resamples, len(x)))], q, axis=1)
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def is_stable(rates: Sequence[float]) -> bool:
    last = list(rates)[-STABILITY_WINDOWS:]
    if len(last) < STABILITY_WINDOWS:
        return False
    mean = sum(last) / len(last)
    return mean > 0 and all(abs(r - mean) <= STABILITY_TOLERANCE * mean for r in last)


def summarize(records: Sequence[Record], t0: float, t1: float, windows: int = 5) -> dict:
    """The summary, latency_ms, stages_ms and stability blocks of a result document,
    from the records that completed inside the measurement interval [t0, t1]."""
    measured = [r for r in records if t0 <= r.end <= t1]
    ok = [r for r in measured if r.ok]
    duration = max(t1 - t0, 1e-9)
    pairs = sum(r.pairs for r in ok)
    stage_names = sorted({k for r in ok for k in r.stages_s})
    rates = window_rates([r.end for r in ok], [r.pairs for r in ok], t0, t1, windows)
    statuses = Counter(str(r.status) for r in measured if r.status is not None)
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
        },
        "latency_ms": latency_summary([r.latency_s for r in ok]),
        "stages_ms": {s: latency_summary([r.stages_s[s] for r in ok if s in r.stages_s]) for s in stage_names},
        "confidence": {
            "level": CONFIDENCE,
            "pairs_per_s": mean_interval(rates),
            "pairs_per_s_method": "Student t over the windows' rates",
            "latency_ms": {k: percentile_interval([r.latency_s for r in ok], PERCENTILES[k]) for k in ("p50", "p99")},
            "latency_method": "bootstrap over requests (percentile method)",
        },
        "stability": {
            "windows": windows,
            "pairs_per_s_by_window": rates,
            "stable": is_stable(rates),
            "rule": f"last {STABILITY_WINDOWS} windows within {STABILITY_TOLERANCE:.0%} of their mean",
        },
        **({"http_status": dict(statuses)} if statuses else {}),
        **({"error_samples": dict(errors.most_common(5))} if errors else {}),
    }
