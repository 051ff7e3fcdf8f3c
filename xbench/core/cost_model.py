"""What a model batch costs, and the batch cuts that cost least.

A forward pass over `rows` pairs padded to `longest` tokens costs about

    overhead + per_token * tokens + per_attention * attention

where `tokens` is what the dense layers (the GEMMs, layer norms, GELU) run on: rows x longest for
a padded backend, the real tokens alone for a packed one (PyTorch packed, CTranslate2); and
`attention` is rows x longest**2, or the sum of each pair's own length squared for a backend
whose attention runs per pair (PyTorch packed: variable-length kernels or groups of similar
length; CTranslate2 pads again for attention). The three coefficients are fitted at start-up from a few timed shapes on the
running backend, so the same planner is right for a 2-core CPU (where padding is costly and a
batch's fixed cost is small) and for a GPU (where the fixed cost dominates). Fits are cached per
machine, model, backend, precision and thread count.

`plan` then cuts length-sorted pairs into the batches of least total estimated cost (dynamic
programming over the cut points), under the row and padded-token caps: no user has to find the
right `max_batch_tokens` for their length mix.

Some padded engines run a length one short of a multiple of 16 far slower than the multiple
itself (OpenVINO's bf16 and int8 kernels on AMX: 8 rows of 95 tokens took about 1.4x 8 rows of 96).
Calibration times a few such lengths both ways; where padding up costs less, the cost model
says so (`length_multiple`), batches are padded to the multiple and planned at that width.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xbench.layout import round_up

log = logging.getLogger(__name__)

# (rows, length) shapes timed by `calibrate`, cheapest first; together they separate the fixed,
# per-token and attention terms (short wide, long narrow, and square-ish batches).
CALIBRATION_SHAPES = ((1, 16), (8, 16), (1, 128), (32, 16), (8, 64), (2, 256), (16, 128), (2, 512))
CALIBRATION_BUDGET_S = 20.0  # stop adding shapes past this (slow precisions on a CPU)
CACHE_VERSION = 3  # 3: length_multiple and its probe, measured for padded backends
# Lengths just past or short of a multiple of ALIGNMENT (residues 1, 8, 15), timed exact and padded up.
ALIGNMENT = 16
ALIGNMENT_PROBES = ((8, 81), (8, 88), (8, 95), (8, 104), (8, 111), (8, 120))


@dataclass(frozen=True)
class CostModel:
    """Estimated seconds of one forward pass; see the module docstring."""

    overhead_s: float
    per_token_s: float
    per_attention_s: float
    packed: bool = False  # dense layers run on the real tokens only
    varlen_attention: bool = False  # attention costs each pair's own length squared
    length_multiple: int = 1  # a padded batch's width is its longest pair rounded up to this
    # seconds of ALIGNMENT_PROBES at their exact lengths and padded up, where probed: why the multiple
    alignment_probe_s: tuple[float, float] | None = None
    source: str = "prior"  # prior | calibrated | cached

    def width(self, longest: int) -> int:
        """The padded width of a batch whose longest pair has `longest` tokens."""
        return round_up(longest, self.length_multiple)

    def batch_cost(self, lengths: Sequence[int]) -> float:
        rows, longest = len(lengths), self.width(max(lengths))
        tokens = sum(lengths) if self.packed else rows * longest
        attention = sum(n * n for n in lengths) if self.varlen_attention else rows * longest * longest
        return self.overhead_s + self.per_token_s * tokens + self.per_attention_s * attention

    def describe(self) -> dict[str, Any]:
        return asdict(self)


# Before calibration: the shape of a small BERT on a CPU (a batch's fixed cost worth ~50 tokens,
# attention a tenth of the dense cost at 128 tokens). Only the ratios matter for planning.
PRIOR = CostModel(overhead_s=50e-6, per_token_s=1e-6, per_attention_s=1e-6 / 1280)


def plan(lengths: Sequence[int] | np.ndarray, cost: CostModel, max_rows: int, max_padded_tokens: int) -> list[np.ndarray]:
    """Positions 0..n-1 cut into batches of least total estimated cost. Each batch is a run of
    the length-sorted order (an optimal cut never interleaves lengths); a batch holds at most
    `max_rows` rows and `max_padded_tokens` padded tokens (a lone over-long pair still runs).
    Cuts fall on multiples of max_rows // 32 rows (every row up to 63-row batches), so a plan
    over thousands of pairs for a wide GPU batch stays a few milliseconds of work; a packed
    model with varlen attention needs no search at all (`fill_greedily`)."""
    n = len(lengths)
    if n == 0:
        return []
    as_array = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(as_array, kind="stable")
    s = as_array[order].astype(np.float64)
    if cost.packed and cost.varlen_attention:
        # Every cut computes the same tokens and attention: the fewest batches cost least, and
        # filling each batch along the sorted order gives them, with no search over cuts.
        return fill_greedily(order, s, max_rows, max_padded_tokens)
    prefix = np.concatenate(([0.0], np.cumsum(s)))
    squares = np.concatenate(([0.0], np.cumsum(s * s)))
    step = max(1, max_rows // 32)
    points = np.unique(np.append(np.arange(0, n, step), n))  # candidate cut positions, 0 .. n
    # Every batch's cost does not depend on the cuts before it, so all of them are priced at once:
    # row t holds the batches ending at points[t] and starting at points[first[t] + c].
    ends = points[1:]
    longest = round_up(s[ends - 1], cost.length_multiple)  # the padded width
    k_max = np.minimum(max_rows, np.maximum(1, max_padded_tokens // np.maximum(longest, 1))).astype(np.int64)
    t_all = np.arange(1, len(points))
    # a step wider than the caps allow: the nearest cut still runs
    first = np.minimum(np.searchsorted(points, ends - k_max), t_all - 1)
    width = int((t_all - first).max())
    begin = np.minimum(first[:, None] + np.arange(width), t_all[:, None] - 1)  # clipped: never chosen
    i = points[begin]
    rows = ends[:, None] - i
    tokens = prefix[ends][:, None] - prefix[i] if cost.packed else rows * longest[:, None]
    attention = (squares[ends][:, None] - squares[i] if cost.varlen_attention
                 else rows * (longest * longest)[:, None])
    price = (cost.overhead_s + cost.per_token_s * tokens + cost.per_attention_s * attention).tolist()
    best = [0.0] * len(points)
    start = [0] * len(points)  # index into points where the last batch begins
    for t, lo, row in zip(t_all.tolist(), first.tolist(), price):
        total = [b + c for b, c in zip(best[lo:t], row)]
        k = total.index(min(total))
        best[t], start[t] = total[k], lo + k
    cuts: list[np.ndarray] = []
    t = len(points) - 1
    while t > 0:
        cuts.append(order[points[start[t]]:points[t]])
        t = start[t]
    return cuts[::-1]


def fill_greedily(order: np.ndarray, lengths: np.ndarray, max_rows: int, max_padded_tokens: int) -> list[np.ndarray]:
    """Positions `order` (of lengths `lengths`, in that order) cut in that order into batches
    filled as far as they go: a batch closes at max_rows rows, or before its padded size (rows x
    its longest) would pass max_padded_tokens; a lone over-budget pair still runs. One numpy
    step a batch, not a Python step a pair: planning runs on the model worker's thread under the
    GIL (the cost search took 1.6 ms over 2048 pairs, 6 µs a pair at 256-row batches; this 0.4)."""
    cuts: list[np.ndarray] = []
    i, n = 0, len(lengths)
    while i < n:
        end = min(n, i + max_rows)
        # r rows fit while r x (the longest of the first r) stays in the budget: grows with r
        fits = np.maximum.accumulate(lengths[i:end]) * np.arange(1, end - i + 1) <= max_padded_tokens
        rows = max(1, int(np.count_nonzero(fits)))
        cuts.append(order[i:i + rows])
        i += rows
    return cuts


def fit(samples: Sequence[tuple[int, int, float]]) -> CostModel:
    """Least-squares fit of (rows, length, seconds) samples, each term kept non-negative (a
    term the data cannot support is dropped and the rest refitted)."""
    x = np.array([[1.0, r * n, r * n * n] for r, n, _ in samples])
    y = np.array([t for _, _, t in samples])
    keep = [0, 1, 2]
    coef = np.zeros(3)
    while keep:
        sol, *_ = np.linalg.lstsq(x[:, keep] / y[:, None], np.ones(len(y)), rcond=None)  # relative error
        if (sol >= 0).all():
            coef[keep] = sol
            break
        keep.pop(int(np.argmin(sol)))
    if coef[1] <= 0:  # the dense term is what every plan relies on; never let it vanish
        coef[1] = float(np.median(y / x[:, 1]))
    return CostModel(float(coef[0]), float(coef[1]), float(coef[2]), source="calibrated")


def calibrate(forward: Callable[[int, int], None], repeats: int = 2, budget_s: float = CALIBRATION_BUDGET_S,
              probe_alignment: bool = False) -> tuple[CostModel, list[tuple[int, int, float]]]:
    """Time `forward(rows, length)` on CALIBRATION_SHAPES (best of `repeats`; the backend is
    already warm) until the budget is spent, and fit a CostModel to the timings (uniform shapes:
    padded and packed costs agree on them, so one fit serves either way of running). With
    `probe_alignment` (a padded backend), also whether padding to ALIGNMENT pays."""
    samples: list[tuple[int, int, float]] = []
    began = time.perf_counter()
    for rows, length in CALIBRATION_SHAPES:
        if len(samples) >= 4 and time.perf_counter() - began > budget_s:
            break
        best = min(_timed(forward, rows, length) for _ in range(repeats))
        samples.append((rows, length, best))
    model = fit(samples)
    if probe_alignment and time.perf_counter() - began < budget_s:  # else a slow model keeps exact widths
        exact, padded = time_alignment(forward, repeats + 1)
        model = replace(model, length_multiple=ALIGNMENT if padded < exact else 1, alignment_probe_s=(exact, padded))
    return model, samples


def time_alignment(forward: Callable[[int, int], None], repeats: int = 3) -> tuple[float, float]:
    """Seconds of ALIGNMENT_PROBES in all at their exact lengths, and padded up to multiples of
    ALIGNMENT (best of `repeats` each, the two ways interleaved)."""
    exact = padded = 0.0
    for rows, length in ALIGNMENT_PROBES:
        up = round_up(length, ALIGNMENT)
        times = [(_timed(forward, rows, length), _timed(forward, rows, up)) for _ in range(repeats)]
        exact += min(t for t, _ in times)
        padded += min(t for _, t in times)
    log.info("alignment probe: exact lengths %.1f ms, padded to %d: %.1f ms", exact * 1e3, ALIGNMENT, padded * 1e3)
    return exact, padded


def _timed(forward: Callable[[int, int], None], rows: int, length: int) -> float:
    t0 = time.perf_counter()
    forward(rows, length)
    return time.perf_counter() - t0


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({**parts, "version": CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_or_calibrate(key_parts: dict[str, Any], forward: Callable[[int, int], None], folder: Path,
                      probe_alignment: bool = False) -> CostModel:
    """The cached fit for these key parts, or a new calibration written to the cache."""
    path = folder / f"{cache_key(key_parts)}.json"
    try:
        doc = json.loads(path.read_text())
        model = CostModel(**doc["model"])
        probe = model.alignment_probe_s
        return replace(model, alignment_probe_s=tuple(probe) if probe else None, source="cached")
    except (OSError, ValueError, TypeError, KeyError):
        pass
    model, samples = calibrate(forward, probe_alignment=probe_alignment)
    log.info("calibrated batch cost model: %s", model)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key_parts, "model": asdict(model), "samples": samples}, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs a calibration per start, nothing more
        log.warning("could not cache the batch cost model in %s: %s", folder, exc)
    return model
