"""Tables in the reference study's columns, as rich (terminal) and markdown (reports). Pairs/s,
P50 and P99 carry the half-width of their 95% confidence interval (bench/stats.py)."""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Table

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


def configuration(doc: dict[str, Any]) -> str:
    p = doc.get("params", {})
    parts = [KIND.get(doc.get("command", ""), doc.get("command", "?"))]
    if doc.get("command") != "tokenize-bench" and p.get("backend"):
        parts.append(f"{p['backend']} {p.get('precision', '')}".strip())
    load = f"rate {p['rate']:g}/s" if p.get("rate") else f"c{p.get('concurrency')}"
    parts.append(f"b{p.get('batch')} {load}")
    if "lengths=" in str(p.get("workload", "")):  # a synthetic mix other than msmarco
        parts.append(str(p["workload"]).split("lengths=")[1].rstrip(")"))
    return " · ".join(parts)


def _efficiency(doc: dict[str, Any]) -> str:
    eff = doc.get("padding", {}).get("efficiency")
    return "-" if eff is None else f"{eff:.0%}"


def _with_interval(value: float | None, interval: list[float] | None, fmt: Any) -> str:
    """'41.2 ±3.1': the value and the half-width of its 95% interval (widest side)."""
    if value is None or not interval:
        return fmt(value)
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
        "yes" if doc.get("stability", {}).get("stable") else "NO",
    ]


def render_table(docs: Sequence[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, header_style="bold", title_justify="left")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="right" if i >= NUMERIC_FROM or "workers" in col else "left")
    for doc in docs:
        table.add_row(*row(doc))
    return table


def markdown_table(docs: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(d)) + " |" for d in docs]
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
