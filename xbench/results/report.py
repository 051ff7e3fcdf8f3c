"""Tables in the reference study's columns, as rich (terminal), markdown (reports) and flat rows
(`xbench report --format csv|json`). Pairs/s, P50 and P99 carry the half-width of their 95%
confidence interval (bench/stats.py); results.md also states each workload and model, and why
a point did not converge."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

from xbench.errors import ConfigError

KIND = {
    "tokenize-bench": "Tokenizer only",
    "infer-bench": "Inference only",
    "pipeline-bench": "Full pipeline",
    "load": "HTTP endpoint",
}

COLUMNS = ["Configuration", "Tokenizer workers", "Model workers", "Parallelism",
           "RPS", "Pairs/s", "Mean", "P50", "P95", "P99", "Token eff.", "Errors", "Stable"]
NUMERIC_FROM = COLUMNS.index("RPS")


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}ms" if x >= 100 else f"{x:.1f}ms")


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


# Grid axes that the table shows already: in columns of their own, or in the label (its kind of
# measurement, its workload).
SHOWN_AXES = {"tokenizer_pool.workers", "tokenizer_pool.parallelism", "model_pool.workers", "workload.lengths",
              "experiment.command"}


def _config_value(config: dict[str, Any], dotted: str) -> Any:
    """A composed config's value at a dotted override key (`model_pool.instances.0.packed`)."""
    node: Any = config
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
    return node


def _grid(doc: dict[str, Any]) -> dict[str, list]:
    return doc.get("config", {}).get("experiment", {}).get("grid") or {}


def grid_values(doc: dict[str, Any]) -> dict[str, Any]:
    """The point's value on each axis of its experiment's grid, in the grid's order."""
    config = doc.get("config", {})
    return {key: _config_value(config, key) for key in _grid(doc)}


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def configuration(doc: dict[str, Any], drop: str = "", workers: bool = False) -> str:
    """A point's name: what ran, on what, under which load and workload, and the experiment's
    other grid axes (or two of its points would read the same). `drop` leaves out the axis a
    chart plots (batch or concurrency); `workers` adds the worker counts, for a chart, which has
    no columns for them."""
    p, command = doc.get("params", {}), doc.get("command", "")
    parts = [KIND.get(command, command or "?")]
    if command != "tokenize-bench" and p.get("backend"):
        parts.append(f"{p['backend']} {p.get('precision', '')}".strip())
        computed = doc.get("engine", {}).get("computed")
        if computed and computed != p.get("precision"):  # mixed or silently lowered: say what ran
            parts.append(f"({computed})")
    recipe = doc.get("model", {}).get("scoring", {}).get("recipe")
    if recipe and recipe != "classifier":  # an LLM reranker: the recipe is part of what ran
        parts.append(recipe)
    mode = doc.get("load", {}).get("mode")
    load = "trace" if mode == "trace" else f"rate {p['rate']:g}/s" if p.get("rate") else f"c{p.get('concurrency')}"
    load_axis = "rate" if p.get("rate") else "concurrency"
    parts.append(" ".join(part for axis, part in (("batch", f"b{p.get('batch')}"), (load_axis, load)) if axis != drop))
    workload = str(p.get("workload", ""))
    if "lengths=" in workload:  # a synthetic mix other than msmarco
        parts.append(workload.split("lengths=")[1].split(")")[0])
    if workload.endswith(" documents a request"):  # request sizes from a distribution
        parts.append(workload.rsplit(", ", 1)[1].replace(" documents a request", " docs"))
    parts += [f"{key.rsplit('.', 1)[-1]}={_text(value)}" for key, value in grid_values(doc).items()
              if key not in SHOWN_AXES]
    if workers and p.get("tokenizer_workers") is not None and command != "infer-bench":
        parts.append(f"tw{p['tokenizer_workers']}" + ("+par" if p.get("parallelism") else ""))
    if workers and p.get("model_workers") is not None and command != "tokenize-bench":
        parts.append(f"mw{p['model_workers']}")
    return " · ".join(part for part in parts if part)


def experiment_id(doc: dict[str, Any]) -> str:
    """The experiment a point belongs to, as `xbench sweep` names it: its run folder's parent
    (results/09_concurrency/RUN/point.json)."""
    return Path(doc.get("_path", "")).parent.parent.name


def spans_experiments(docs: Sequence[dict[str, Any]]) -> bool:
    """Points of several experiments (a study), where one point may be measured by two of them."""
    return len({experiment_id(d) for d in docs}) > 1


def in_order(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points as a table shows them: run by run in the order given, and within a run along the
    experiment's own axes (its grid in the order the experiment lists its values, then batch
    size and load), not by file name."""
    runs: dict[str, int] = {}

    def key(doc: dict[str, Any]) -> tuple:
        p, grid = doc.get("params", {}), _grid(doc)
        axes = [grid[k].index(v) if v in grid[k] else len(grid[k]) for k, v in grid_values(doc).items()]
        return (runs.setdefault(str(Path(doc.get("_path", "")).parent), len(runs)), axes,
                p.get("batch") or 0, p.get("concurrency") or 0, p.get("rate") or 0, doc.get("_path", ""))

    return sorted(docs, key=key)


def _efficiency(doc: dict[str, Any]) -> str:
    eff = doc.get("padding", {}).get("efficiency")
    return "-" if eff is None else f"{eff:.0%}"


def _with_interval(value: float | None, interval: list[float | None] | None, fmt: Any) -> str:
    """'41.2 ±3.1': the value and the half-width of its 95% interval (widest side); '±?' when
    the sample cannot bound it (a p99 of a few hundred requests)."""
    if value is None or not interval:
        return fmt(value)
    if interval[0] is None or interval[1] is None:
        return f"{fmt(value)} ±?"
    half = max(value - interval[0], interval[1] - value)
    return f"{fmt(value)} ±{fmt(half)}"


def row(doc: dict[str, Any]) -> list[str]:
    p, s, lat = doc.get("params", {}), doc.get("summary", {}), doc.get("latency_ms", {})
    if doc.get("error"):
        return [configuration(doc), "", "", "", "failed", "", "", "", "", "", "", doc["error"][:40], ""]
    par = p.get("parallelism")
    ci = doc.get("confidence", {})
    ci_lat = ci.get("latency_ms", {})
    return [
        configuration(doc),
        str(p.get("tokenizer_workers", "-")) if doc.get("command") != "infer-bench" else "-",
        str(p.get("model_workers", "-")) if doc.get("command") != "tokenize-bench" else "-",
        "-" if par is None or doc.get("command") == "infer-bench" else ("on" if par else "off"),
        _rate(s.get("requests_per_s")),
        _with_interval(s.get("pairs_per_s"), ci.get("pairs_per_s"), _rate),
        _ms(lat.get("mean")), _with_interval(lat.get("p50"), ci_lat.get("p50"), _ms), _ms(lat.get("p95")),
        _with_interval(lat.get("p99"), ci_lat.get("p99"), _ms),
        _efficiency(doc),
        str(s.get("errors", 0)),
        _stable(doc.get("stability", {})),
    ]


def _stable(st: dict[str, Any]) -> str:
    if st.get("stable"):
        return "yes"
    return f"NO ({st['spread_pct']:.0f}%)" if st.get("spread_pct") is not None else "NO"


def export_rows(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per point: the table's columns as numbers, with the 95% interval bounds."""
    rows = []
    for d in docs:
        p, s, lat = d.get("params", {}), d.get("summary", {}), d.get("latency_ms", {})
        ci = d.get("confidence", {})
        st, wl = d.get("stability", {}), d.get("workload", {})

        def bounds(interval: list[float] | None) -> tuple[float | None, float | None]:
            return (interval[0], interval[1]) if interval else (None, None)

        pairs_lo, pairs_hi = bounds(ci.get("pairs_per_s"))
        p50_lo, p50_hi = bounds(ci.get("latency_ms", {}).get("p50"))
        p99_lo, p99_hi = bounds(ci.get("latency_ms", {}).get("p99"))
        rows.append({
            "configuration": configuration(d), "command": d.get("command"), "experiment": d.get("experiment"),
            "model": d.get("model", {}).get("name"), "backend": p.get("backend"), "precision": p.get("precision"),
            "device": p.get("device"), "batch": p.get("batch"), "concurrency": p.get("concurrency"),
            "rate": p.get("rate"), "tokenizer_workers": p.get("tokenizer_workers"),
            "model_workers": p.get("model_workers"), "parallelism": p.get("parallelism"),
            "requests_per_s": s.get("requests_per_s"), "pairs_per_s": s.get("pairs_per_s"),
            "pairs_per_s_ci_low": pairs_lo, "pairs_per_s_ci_high": pairs_hi,
            "mean_ms": lat.get("mean"), "p50_ms": lat.get("p50"), "p50_ms_ci_low": p50_lo, "p50_ms_ci_high": p50_hi,
            "p95_ms": lat.get("p95"), "p99_ms": lat.get("p99"), "p99_ms_ci_low": p99_lo, "p99_ms_ci_high": p99_hi,
            "token_efficiency": d.get("padding", {}).get("efficiency"), "requests": s.get("requests"),
            "errors": s.get("errors"), "shed": s.get("shed"), "shed_fraction": s.get("shed_fraction"),
            "stable": st.get("stable"), "spread_pct": st.get("spread_pct"),
            "measured_s": d.get("load", {}).get("measured_s"), "workload": wl.get("source", p.get("workload")),
            "workload_sha256": wl.get("sha256"), "error": d.get("error"), "file": d.get("_path"),
        })
    return rows


EXPORT_FORMATS = ("md", "csv", "json")


def export_text(docs: Sequence[dict[str, Any]], fmt: str) -> str:
    """`xbench report`: the points as markdown, CSV or JSON."""
    import csv
    import io
    import json

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    docs = in_order(docs)
    if fmt == "md":
        return "\n".join([markdown_table(docs), context_section(docs), convergence_section(docs)])
    rows = export_rows(docs)
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["configuration"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _lengths(profile: dict[str, Any], unit: str) -> str:
    return (f"{profile['pairs']} pairs, {unit} per pair: mean {profile['mean']:.0f}, median {profile['p50']:.0f}, "
            f"p90 {profile['p90']:.0f}, p99 {profile['p99']:.0f}, max {profile['max']}")


def context_section(docs: Sequence[dict[str, Any]]) -> str:
    """What was measured: each distinct workload (its source, file hash and length statistics) and
    model, so two runs are never compared blind."""
    workloads: dict[str, str] = {}
    models: dict[str, str] = {}
    for d in docs:
        wl = d.get("workload") or {"source": d.get("params", {}).get("workload")}
        line = f"`{wl.get('source')}`" + (f" (sha256 {wl['sha256'][:16]})" if wl.get("sha256") else "")
        if wl.get("pair_tokens"):
            line += f": {_lengths(wl['pair_tokens'], 'tokens')}"
        elif wl.get("pair_chars"):
            line += f": {_lengths(wl['pair_chars'], 'characters')}"
        workloads.setdefault(str(wl.get("source")), line)
        m = d.get("model") or {}
        if m.get("name"):
            facts = [m.get("source"), m.get("num_layers") and f"{m['num_layers']} layers",
                     m.get("hidden_size") and f"hidden {m['hidden_size']}",
                     {True: "relevance-trained", False: "seeded head, not relevance-trained"}.get(m.get("relevance_trained"))]
            facts = [str(f) for f in facts if f]
            models.setdefault(m["name"], f"`{m['name']}`" + (f" ({', '.join(facts)})" if facts else ""))
    machines = Counter(f"{e.get('host') or '?'} ({e.get('cpu')}, {e.get('gpu') or 'no GPU'})"
                       for e in (d.get("env") for d in docs) if e)
    lines = ["## What was measured\n"]
    lines += [f"- **Workload** {w}" for w in workloads.values()]
    lines += [f"- **Model** {m}" for m in models.values()]
    if len({m.split(" (", 1)[1] for m in machines}) > 1:
        lines.append("- **Warning: the points were measured on machines that differ**, so rows are not comparable "
                     "across them: " + "; ".join(f"{m}: {n} point(s)" for m, n in machines.items()))
    elif len(machines) > 1:
        lines.append(f"- **Machines** {len(machines)} of the same kind: " + ", ".join(m.split(" (")[0] for m in machines))
    return "\n".join(lines) + "\n"


def convergence_section(docs: Sequence[dict[str, Any]]) -> str:
    """Why each unstable point did not converge, in the terms of the rule it was measured by."""
    lines = []
    for d in docs:
        st = d.get("stability", {})
        if d.get("error") or st.get("stable"):
            continue
        windows, spread = st.get("windows", 0), st.get("spread_pct")
        seconds = d.get("load", {}).get("measured_s")
        why = (f"its last 3 windows still differed by {spread:.0f}% ({st.get('metric', 'pairs/s')})"
               if spread is not None else f"only {windows} window(s) closed")
        p50 = d.get("latency_ms", {}).get("p50")
        window_s = (st.get("window_s") or [None])[0]
        if p50 and window_s and p50 / 1000 * 3 > window_s:
            why += f"; one request takes {p50 / 1000:.1f} s, so few requests fit a window"
        limit = st.get("time_limit_s")
        when = f"after {seconds:.0f} s" if seconds else "at its time limit"
        lines.append(f"- {configuration(d)}: stopped {when}" + (f" (limit {limit:.0f} s)" if limit else "")
                     + f", {why}. Give it a longer `experiment.max_duration_s` or a larger `experiment.duration_s`.")
    if not lines:
        return ""
    return "## Points that did not converge\n\n" + "\n".join(lines) + "\n"


def _shed(doc: dict[str, Any]) -> str:
    s = doc.get("summary", {})
    return "-" if s.get("shed_fraction") is None else f"{s['shed_fraction']:.0%}"


def table_cells(docs: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows, in table order; a table that spans several experiments (a study) names
    each row's experiment first; a table of HTTP loads adds the share of requests shed (429)."""
    docs = in_order(docs)
    columns, rows = list(COLUMNS), [row(d) for d in docs]
    if any("shed_fraction" in d.get("summary", {}) for d in docs):
        at = columns.index("Errors") + 1
        columns.insert(at, "Shed")
        for cells, d in zip(rows, docs):
            cells.insert(at, _shed(d))
    if spans_experiments(docs):
        return ["Experiment", *columns], [[experiment_id(d), *cells] for d, cells in zip(docs, rows)]
    return columns, rows


def render_table(docs: Sequence[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, header_style="bold", title_justify="left")
    columns, rows = table_cells(docs)
    for col in columns:
        numeric = col in COLUMNS[NUMERIC_FROM:] or col == "Shed" or "workers" in col
        table.add_column(col, justify="right" if numeric else "left")
    for cells in rows:
        table.add_row(*cells)
    return table


STAGES = ("queue", "tokenize", "infer", "rest")


def stages_table(docs: Sequence[dict[str, Any]], title: str | None = None) -> Table | None:
    """Where the time went: p50 / p99 of each stage the server reported (its timing headers, or
    the pipeline's own clock in process) and of the rest (client, network, what no stage covers).
    None when no point has stages: a column the server did not report is absent, never zero."""
    docs = in_order(docs)
    stages = [s for s in STAGES if any(s in d.get("stages_ms", {}) for d in docs)]
    if not stages:
        return None
    table = Table(title=title, header_style="bold", title_justify="left")
    table.add_column("Configuration")
    for stage in ["latency", *stages]:
        table.add_column(f"{stage} p50 / p99", justify="right")
    for d in docs:
        cells = [f"{_ms(d.get('latency_ms', {}).get('p50'))} / {_ms(d.get('latency_ms', {}).get('p99'))}"]
        for stage in stages:
            st = d.get("stages_ms", {}).get(stage)
            cells.append(f"{_ms(st.get('p50'))} / {_ms(st.get('p99'))}" if st else "-")
        table.add_row(configuration(d), *cells)
    return table


def markdown_table(docs: Sequence[dict[str, Any]]) -> str:
    columns, rows = table_cells(docs)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def environment_line(env: dict[str, Any]) -> str:
    gpu = env.get("gpu") or "no GPU"
    return (f"{env.get('cpu')} ({env.get('cores')} cores), {gpu}; Python {env.get('python')}, "
            f"torch {env.get('torch')}, transformers {env.get('transformers')}, xbench {env.get('xbench')}"
            + (f", commit {env['git_commit'][:10]}" if env.get("git_commit") else ""))


# The reference study: MiniLM-L-6-v2 cross-encoder on an Apple M-series GPU (MPS, fp16),
# batch 128 pairs per request, concurrency 16.
REFERENCE_ROWS = [
    ("Tokenizer only", "1", "-", "off", "156", "~20k", "101ms", "94ms", "225ms", "245ms"),
    ("Tokenizer only", "1", "-", "on", "301", "~38.5k", "52ms", "45ms", "78ms", "192ms"),
    ("Tokenizer only", "4", "-", "on", "489", "~62.5k", "32ms", "32ms", "56ms", "91ms"),
    ("Inference only", "-", "1", "-", "64", "~8.2k", "248ms", "201ms", "442ms", "489ms"),
    ("Inference only", "-", "4", "-", "147", "~18.9k", "150ms", "137ms", "406ms", "490ms"),
    ("Full pipeline", "1", "1", "off", "57", "~7.3k", "276ms", "360ms", "486ms", "497ms"),
    ("Full pipeline", "1", "1", "on", "58", "~7.4k", "274ms", "353ms", "485ms", "497ms"),
    ("Full pipeline", "2", "4", "on", "111", "~14.2k", "156ms", "91ms", "456ms", "501ms"),
]


def reference_table() -> str:
    cols = COLUMNS[: NUMERIC_FROM + 6]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in REFERENCE_ROWS]
    return "\n".join(lines) + "\n"
