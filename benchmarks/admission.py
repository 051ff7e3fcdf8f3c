"""Benchmark: does default `xbench serve` carry what the in-process pipeline carries, and shed only
real overload?

One server with the default config (plus any overrides) and one in-process pipeline of the same
config, in one run on one machine:

  closed   for each --concurrency: `xbench load` against the server and in-process pipeline-bench,
           alternating, same batch and workload: pairs/s of each, their ratio, and every HTTP
           status the load got (a closed loop must see no 429)
  open     Poisson arrivals at --overload x the server's capacity (its closed-loop requests/s at
           the middle concurrency) for --duration s: share shed, the accepted requests' latency,
           their server-side queue time against max_queue_wait_ms, and one request's service time
           alone (the closed loop at concurrency 1)

    python benchmarks/admission.py [--batch 32] [--concurrency 1,4,16] [--lengths longtail] [overrides]
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from xbench.bench.http import HttpTarget
from xbench.bench.runners import PipelineTarget, load_spec, measure
from xbench.config import compose_config, to_dict
from xbench.results.store import environment, write_json
from serving import start_server
from xbench.workload import make_workload

console = Console(width=160)


def main(
    overrides: Optional[List[str]] = typer.Argument(None),
    batch: int = typer.Option(32),
    concurrency: str = typer.Option("1,4,16", help="Closed-loop client counts, comma-separated."),
    lengths: str = typer.Option("longtail", help="workload.lengths: msmarco, longtail."),
    duration: float = typer.Option(20.0),
    warmup: float = typer.Option(5.0),
    overload: float = typer.Option(4.0, help="Open-loop rate as a multiple of the measured capacity."),
    out: Path = typer.Option(Path("results/benchmarks/admission.json"), "--out", "-o"),
) -> None:
    overrides = [*(overrides or []), f"workload.lengths={lengths}"]
    levels = [int(c) for c in concurrency.split(",")]
    cfg = compose_config([*overrides, f"experiment.duration_s={duration}", f"experiment.warmup_s={warmup}"])
    workload = make_workload(None, cfg)
    server = start_server(overrides)
    inproc = PipelineTarget(cfg)
    http = HttpTarget(server.url, "cohere")
    closed: list[dict] = []
    try:
        for c in levels:
            point = {"concurrency": c}
            for name, target in (("pipeline-bench", inproc), ("load", http)):
                with console.status(f"closed loop, {c} clients: {name} ..."):
                    point[name] = asyncio.run(measure(target, workload, batch, load_spec(cfg, c)))
            closed.append(point)
        middle = closed[len(closed) // 2]
        capacity = middle["load"]["summary"]["requests_per_s"]
        spec = load_spec(cfg, 1)
        spec.rate, spec.warmup_s, spec.max_duration_s = overload * capacity, 0.0, duration
        with console.status(f"open loop at {overload:g}x capacity ({spec.rate:.2f} requests/s) ..."):
            opened = asyncio.run(measure(http, workload, batch, spec))
    finally:
        inproc.close()
        server.stop()

    bound_ms = float(cfg.server.max_queue_wait_ms)
    table = Table(title=f"xbench serve (default admission) vs in-process, {lengths} pairs, {batch} documents a request")
    for col in ("load", "in-process pairs/s", "HTTP pairs/s", "HTTP / in-process", "HTTP statuses",
                "accepted p50", "accepted p99", "server queue p99"):
        table.add_column(col, justify="left" if col in ("load", "HTTP statuses") else "right")
    for point in closed:
        here, there = point["pipeline-bench"], point["load"]
        point["ratio"] = there["summary"]["pairs_per_s"] / here["summary"]["pairs_per_s"]
        table.add_row(f"closed, {point['concurrency']} clients", f"{here['summary']['pairs_per_s']:.1f}",
                      f"{there['summary']['pairs_per_s']:.1f}", f"{point['ratio']:.2f}",
                      str(there.get("http_status", {})), f"{there['latency_ms']['p50']:,.0f} ms",
                      f"{there['latency_ms']['p99']:,.0f} ms", _queue_p99(there))
    table.add_row(f"open, {spec.rate:.2f}/s ({overload:g}x capacity)", "-",
                  f"{opened['summary']['pairs_per_s']:.1f}", "-", str(opened.get("http_status", {})),
                  f"{opened['latency_ms']['p50'] or 0:,.0f} ms", f"{opened['latency_ms']['p99'] or 0:,.0f} ms",
                  _queue_p99(opened))
    console.print(table)
    alone = closed[0]["load"]["latency_ms"]["p50"] if levels[0] == 1 else None
    console.print(f"max_queue_wait_ms {bound_ms:.0f}; one request alone (closed loop, 1 client) p50 "
                  + (f"{alone:,.0f} ms" if alone else "not measured (start --concurrency at 1)")
                  + f"; shed in the open loop: {opened['summary'].get('shed_fraction', 0):.0%}")
    write_json(out, {"env": environment(), "config": to_dict(cfg), "batch": batch, "lengths": lengths,
                     "closed": closed, "open": {"rate": spec.rate, "overload": overload, "capacity": capacity,
                                                "result": opened},
                     "max_queue_wait_ms": bound_ms, "alone_p50_ms": alone})
    console.print(f"[dim]raw: {out}[/]")


def _queue_p99(doc: dict) -> str:
    queue = doc.get("stages_ms", {}).get("queue", {}).get("p99")
    return "-" if queue is None else f"{queue:,.0f} ms"


if __name__ == "__main__":
    typer.run(main)
