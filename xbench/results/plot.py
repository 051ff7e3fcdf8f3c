"""`xbench plot`: PNG charts of result documents and a self-contained index.html. Throughput and
latency percentiles carry error bars at their 95% confidence intervals."""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xbench.errors import DataError  # noqa: E402
from xbench.results.report import (configuration, environment_line, experiment_id, in_order,  # noqa: E402
                                   spans_experiments, table_cells)
from xbench.results.store import read_results  # noqa: E402


def _lines(docs: list[dict], axis: str) -> dict[str, list[tuple[float, dict]]]:
    out: dict[str, list[tuple[float, dict]]] = defaultdict(list)
    for d in docs:
        x = d["params"].get(axis)
        if x is not None:
            out[configuration(d, drop=axis, workers=True)].append((float(x), d))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items() if len({x for x, _ in v}) >= 2}


def _interval(doc: dict, metric: str) -> list[float] | None:
    """A document's 95% interval of pairs/s or of a latency percentile (bench/stats.py)."""
    ci = doc.get("confidence", {})
    return ci.get("pairs_per_s") if metric == "pairs_per_s" else ci.get("latency_ms", {}).get(metric)


def _value(doc: dict, metric: str) -> float:
    return doc["summary"]["pairs_per_s"] if metric == "pairs_per_s" else doc["latency_ms"][metric]


def _errors(values: list[float], intervals: list[list[float | None] | None]) -> list[list[float]]:
    """Error bar lengths [below, above] from 95% intervals (clipped at 0; none where none, and
    none on a side the sample could not bound)."""
    return [[max(0.0, v - max(i[0], 0.0)) if i and i[0] is not None else 0.0 for v, i in zip(values, intervals)],
            [max(0.0, i[1] - v) if i and i[1] is not None else 0.0 for v, i in zip(values, intervals)]]


def _with_bars(ax: plt.Axes, xs: list[float], docs: list[dict], metric: str, fmt: str = "-", **kwargs: Any) -> None:
    """A line with error bars at each point's 95% confidence interval."""
    ys = [_value(d, metric) for d in docs]
    ax.errorbar(xs, ys, yerr=_errors(ys, [_interval(d, metric) for d in docs]), fmt=fmt, capsize=3, **kwargs)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rates(by_rate: dict[str, list[tuple[float, dict]]], path: Path) -> Path:
    """Open-loop points over offered rates (a `--ramp`'s steps): where latency turns up, and what
    was served, met every goodput bound, or was shed at each rate."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label, pts in by_rate.items():
        xs = [x for x, _ in pts]
        points = [d for _, d in pts]
        for q, style in (("p50", "-"), ("p99", ":")):
            _with_bars(ax2, xs, points, q, style, marker="o", label=f"{label} {q}")
        ax1.plot(xs, [d["summary"]["requests_per_s"] for d in points], "-o", label=f"{label} answered 200")
        if all("goodput" in d for d in points):
            ax1.plot(xs, [d["goodput"]["requests_per_s"] for d in points], "--s", label=f"{label} goodput")
        if any(d["summary"].get("shed") for d in points):
            ax1.plot(xs, [d["summary"]["shed"] / d["summary"]["duration_s"] for d in points], ":x",
                     label=f"{label} shed (429)")
    top = max(x for pts in by_rate.values() for x, _ in pts)
    ax1.plot([0, top], [0, top], color="gray", alpha=0.4, label="offered")
    ax1.set(title="Served vs offered rate", xlabel="offered requests/s", ylabel="requests/s")
    ax2.set(title="Latency vs offered rate", xlabel="offered requests/s", ylabel="latency (ms)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_ramp(docs: list[dict], path: Path) -> Path:
    """The chart of a `--ramp`'s steps."""
    return plot_rates(_lines(docs, "rate"), path)


def plot_results(path: Path, out: Path) -> list[Path]:
    docs = in_order([d for d in read_results(path) if not d.get("error") and d.get("summary")])
    if not docs:
        raise DataError(f"{path}: no result documents to plot")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    by_conc = _lines(docs, "concurrency")
    if by_conc:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
        for label, pts in by_conc.items():
            xs = [x for x, _ in pts]
            _with_bars(ax1, xs, [d for _, d in pts], "pairs_per_s", marker="o", label=label)
            for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
                _with_bars(ax2, xs, [d for _, d in pts], q, style, marker="o", label=f"{label} {q}")
        ax1.set(title="Throughput vs concurrency", xlabel="concurrent clients", ylabel="pairs/s")
        ax2.set(title="Latency percentiles vs concurrency", xlabel="concurrent clients", ylabel="latency (ms)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, out / "concurrency.png"))

    by_rate = _lines(docs, "rate")
    if by_rate:
        written.append(plot_rates(by_rate, out / "rate.png"))

    by_batch = _lines(docs, "batch")
    if by_batch:
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for label, pts in by_batch.items():
            _with_bars(ax, [x for x, _ in pts], [d for _, d in pts], "pairs_per_s", marker="o", label=label)
        ax.set(title="Throughput vs batch size", xlabel="pairs per request", ylabel="pairs/s", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "batch_size.png"))

    tok = [d for d in docs if d["command"] == "tokenize-bench"]
    if tok:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
        for par in (False, True):
            # one point per worker count (a later run of the same point replaces an earlier one)
            per_workers = {d["params"]["tokenizer_workers"]: d for d in tok if bool(d["params"].get("parallelism")) == par}
            pts = sorted(per_workers.items(), key=lambda t: t[0])
            if pts:
                name, color = f"parallelism {'on' if par else 'off'}", "tab:orange" if par else "tab:blue"
                ws = [w for w, _ in pts]
                points = [d for _, d in pts]
                _with_bars(ax1, ws, points, "pairs_per_s", marker="o", color=color, label=name)
                _with_bars(ax2, ws, points, "p50", marker="o", color=color, label=f"{name} p50")
                _with_bars(ax2, ws, points, "p99", ":", marker="o", color=color, label=f"{name} p99")
        ax1.set(title="Tokenizer throughput vs workers", xlabel="tokenizer workers", ylabel="pairs/s")
        ax1.xaxis.get_major_locator().set_params(integer=True)
        ax2.xaxis.get_major_locator().set_params(integer=True)
        ax2.set(title="Tokenizer latency vs workers", xlabel="tokenizer workers", ylabel="latency (ms)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        written.append(_save(fig, out / "tokenizer_scaling.png"))

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(docs) + 1.5))
    several = spans_experiments(docs)
    labels = [(f"{experiment_id(d)}: " if several else "") + configuration(d, workers=True) for d in docs]
    values = [d["summary"]["pairs_per_s"] for d in docs]
    colors = [{"tokenize-bench": "tab:green", "infer-bench": "tab:orange", "pipeline-bench": "tab:blue"}.get(d["command"], "tab:gray")
              for d in docs]
    ax.barh(range(len(docs)), values, color=colors, xerr=_errors(values, [_interval(d, "pairs_per_s") for d in docs]),
            capsize=3)
    ax.set_yticks(range(len(docs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(title="Throughput per configuration", xlabel="pairs/s", xscale="log" if max(values) > 50 * min(values) else "linear")
    ax.grid(axis="x", alpha=0.3)
    written.append(_save(fig, out / "configurations.png"))

    written.append(_index(docs, written, out / "index.html"))
    return written


def _index(docs: list[dict], charts: list[Path], path: Path) -> Path:
    """One self-contained page: the table and every chart (embedded, so the file travels alone)."""
    env = docs[0].get("env", {})
    columns, rows = table_cells(docs)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    imgs = "".join(
        f'<figure><img alt="{c.stem}" src="data:image/png;base64,{base64.b64encode(c.read_bytes()).decode()}">'
        f'<figcaption><a href="{c.name}">{c.name}</a></figcaption></figure>' for c in charts)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>xbench results</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>xbench results</h1><p>{html.escape(environment_line(env))}</p>
<p>Model: {html.escape(str(docs[0].get('model', {}).get('name')))} (relevance_trained: {docs[0].get('model', {}).get('relevance_trained')})</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{imgs}</body></html>"""
    path.write_text(page)
    return path
