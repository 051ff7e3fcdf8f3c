"""`xbench compare A B`: matching points of two runs, their ratios, flagged past the noise: a
ratio past the threshold counts only when the two 95% confidence intervals do not overlap.
A point is "inconclusive" when its intervals overlap (the two runs cannot be told apart), and
"below the threshold" when they are apart but the change is smaller than the threshold floor."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from xbench.errors import DataError
from xbench.results.report import configuration, grid_values
from xbench.results.store import read_results

MATCH_KEYS = ("backend", "precision", "device", "batch", "concurrency", "rate", "tokenizer_workers",
              "model_workers", "parallelism", "api")


def point_key(doc: dict) -> tuple:
    """What makes two runs' points the same point: the command, the MATCH_KEYS, the workload and
    the experiment's grid axes (a length-mix run has four points with equal MATCH_KEYS)."""
    p = doc.get("params", {})
    axes = tuple(sorted((key, repr(value)) for key, value in grid_values(doc).items()))
    return (doc.get("command"), *(p.get(k) for k in MATCH_KEYS), p.get("workload"), axes)


def _load(path: Path) -> dict[tuple, dict]:
    docs = [d for d in read_results(path) if not d.get("error")]
    if not docs:
        raise DataError(f"{path}: no result documents")
    return {point_key(d): d for d in docs}


def _apart(a: list[float | None] | None, b: list[float | None] | None) -> bool:
    """The two 95% intervals do not overlap (no interval: decided by the threshold alone; an
    unknown bound reaches as far as it may)."""
    if not a or not b:
        return True
    inf = float("inf")
    a_lo, a_hi = (-inf if a[0] is None else a[0]), (inf if a[1] is None else a[1])
    b_lo, b_hi = (-inf if b[0] is None else b[0]), (inf if b[1] is None else b[1])
    return a_hi < b_lo or b_hi < a_lo


def compare(a: Path, b: Path, threshold: float) -> list[dict]:
    """A change is flagged when its ratio passes the threshold AND the two points' confidence
    intervals do not overlap; with overlapping intervals it is inconclusive."""
    base, cand = _load(Path(a)), _load(Path(b))
    rows = []
    for key in sorted(set(base) & set(cand), key=str):
        da, db = base[key], cand[key]
        pa, pb = da["summary"]["pairs_per_s"], db["summary"]["pairs_per_s"]
        la, lb = da["latency_ms"].get("p99"), db["latency_ms"].get("p99")
        speed = pb / pa if pa else float("nan")
        p99 = lb / la if la and lb else float("nan")
        ca, cb = da.get("confidence", {}), db.get("confidence", {})
        speed_apart = _apart(ca.get("pairs_per_s"), cb.get("pairs_per_s"))
        p99_apart = _apart(ca.get("latency_ms", {}).get("p99"), cb.get("latency_ms", {}).get("p99"))
        worse = (speed < 1 - threshold, p99 > 1 + threshold)
        better = (speed > 1 + threshold, p99 < 1 - threshold)
        rows.append({
            "point": configuration(db), "a_pairs_per_s": pa, "b_pairs_per_s": pb, "pairs_ratio": speed,
            "a_p99_ms": la, "b_p99_ms": lb, "p99_ratio": p99,
            "regression": (worse[0] and speed_apart) or (worse[1] and p99_apart),
            "improvement": (better[0] and speed_apart) or (better[1] and p99_apart),
        })
        flagged = rows[-1]["regression"] or rows[-1]["improvement"]
        # Not flagged: either the intervals overlap (the runs cannot be told apart), or they are
        # apart but the change is under the threshold floor.
        rows[-1]["inconclusive"] = not flagged and not (speed_apart and p99_apart)
    if not rows:
        raise DataError(f"no point of {a} matches a point of {b} (same command, backend, precision, batch, load, workers, "
                        "workload and grid axes)")
    return rows


def render(rows: list[dict], a: Path, b: Path, threshold: float) -> Table:
    t = Table(title=f"{b} vs {a} (flagged past ±{threshold:.0%} with 95% intervals apart)", header_style="bold")
    for col in ("point", "pairs/s A", "pairs/s B", "B/A", "p99 A", "p99 B", "B/A ", "verdict"):
        t.add_column(col, justify="left" if col in ("point", "verdict") else "right")
    for r in rows:
        t.add_row(r["point"], f"{r['a_pairs_per_s']:.1f}", f"{r['b_pairs_per_s']:.1f}", f"{r['pairs_ratio']:.2f}",
                  f"{r['a_p99_ms'] or 0:.0f}ms", f"{r['b_p99_ms'] or 0:.0f}ms", f"{r['p99_ratio']:.2f}",
                  verdict(r, threshold))
    return t


def verdict(row: dict, threshold: float) -> str:
    """One compared point's verdict, with rich markup."""
    return ("[red]regression[/]" if row["regression"] else "[green]improvement[/]" if row["improvement"]
            else "[yellow]inconclusive[/] (intervals overlap)" if row["inconclusive"]
            else f"below the ±{threshold:.0%} threshold")
