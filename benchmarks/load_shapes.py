"""Benchmark: `xbench load`'s production shapes against one default `xbench serve`, in one run.

  capacity  closed loop, 4 clients, --documents a request: the server's requests/s
  ramp      --ramp from 10% to 150% of capacity in 8 steps, with a goodput bound: where p99 turns
            up and goodput falls (one result per step and ramp.png)
  bursts    the same mean rate (70% of capacity) with Poisson (B = 1) and bursty (B = 0.25) arrivals
  trace     a recorded trace of --trace-requests requests at --trace-rate requests/s, replayed: how
            late each was sent (send-time error)

    python benchmarks/load_shapes.py [--documents 16] [--seconds 40] [overrides]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from xbench.results.store import environment, write_json
from serving import start_server

console = Console(width=150)


def load(url: str, out: Path, *args: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "xbench", "load", url, "-o", str(out), *args], capture_output=True,
                            text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"xbench load {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    files = sorted(out.glob("*.json")) if out.is_dir() else [out]
    return [json.loads(f.read_text()) for f in files]


def main(
    overrides: Optional[List[str]] = typer.Argument(None),
    documents: int = typer.Option(16),
    seconds: float = typer.Option(40.0, help="The ramp's length."),
    bound_ms: float = typer.Option(2000.0, help="Goodput: latency_ms<= this."),
    trace_requests: int = typer.Option(200),
    trace_rate: float = typer.Option(20.0),
    out: Path = typer.Option(Path("results/benchmarks/load_shapes.json"), "--out", "-o"),
) -> None:
    work = Path(tempfile.mkdtemp(prefix="xbench-shapes-"))
    server = start_server(list(overrides or []))
    report: dict = {"env": environment(), "documents": documents}
    try:
        with console.status("capacity (closed loop, 4 clients) ..."):
            cap = load(server.url, work / "capacity.json", "-b", str(documents), "-c", "4", "-d", "15", "--warmup", "3")[0]
        capacity = cap["summary"]["requests_per_s"]
        report["capacity_requests_per_s"] = capacity
        with console.status(f"ramp 10% to 150% of {capacity:.2f} requests/s over {seconds:g} s ..."):
            ramp = load(server.url, work / "ramp", "-b", str(documents), "--ramp",
                        f"{0.1 * capacity:.3f}:{1.5 * capacity:.3f}:{seconds}", "--goodput", f"latency_ms<={bound_ms:g}")
        report["ramp"] = [{"rate": d["params"]["rate"], "p50_ms": d["latency_ms"]["p50"], "p99_ms": d["latency_ms"]["p99"],
                           "served_per_s": d["summary"]["requests_per_s"], "goodput_per_s": d["goodput"]["requests_per_s"],
                           "goodput_fraction": d["goodput"]["fraction"], "shed": d["summary"].get("shed", 0)}
                          for d in sorted(ramp, key=lambda d: d["params"]["rate"])]
        report["ramp_chart"] = str(work / "ramp" / "ramp.png")
        bursts = {}
        for b in (1.0, 0.25):
            with console.status(f"open loop at 70% of capacity, burstiness {b:g} ..."):
                d = load(server.url, work / f"burst-{b}.json", "-b", str(documents), "--rate", f"{0.7 * capacity:.3f}",
                         "--burstiness", str(b), "-d", "30", "--warmup", "3")[0]
            bursts[str(b)] = {"p50_ms": d["latency_ms"]["p50"], "p99_ms": d["latency_ms"]["p99"],
                              "requests": d["summary"]["requests"], "shed": d["summary"].get("shed", 0)}
        report["bursts"] = bursts
        trace = work / "trace.jsonl"
        trace.write_text("".join(json.dumps({"timestamp": k / trace_rate, "query": f"query {k % 7}",
                                             "documents": [f"document {k} {j}" for j in range(2)]}) + "\n"
                                 for k in range(trace_requests)))
        with console.status(f"trace of {trace_requests} requests at {trace_rate:g}/s ..."):
            d = load(server.url, work / "trace.json", "--trace", str(trace))[0]
        report["trace"] = {"requests": d["summary"]["requests"], "errors": d["summary"]["errors"],
                           "send_lag_ms": d["load"]["send_lag_ms"]}
        chart = Path(out).with_name(Path(out).stem + "-ramp.png")
        chart.parent.mkdir(parents=True, exist_ok=True)
        chart.write_bytes(Path(report["ramp_chart"]).read_bytes())
        report["ramp_chart"] = str(chart)
    finally:
        server.stop()

    table = Table(title=f"ramp: {documents} documents a request, capacity {capacity:.2f} requests/s (closed loop, 4 clients)")
    for col in ("offered /s", "served /s", f"goodput /s (≤ {bound_ms:g} ms)", "goodput share", "p50", "p99", "shed"):
        table.add_column(col, justify="right")
    for step in report["ramp"]:
        table.add_row(f"{step['rate']:.2f}", f"{step['served_per_s']:.2f}", f"{step['goodput_per_s']:.2f}",
                      f"{step['goodput_fraction']:.0%}", f"{step['p50_ms']:,.0f} ms", f"{step['p99_ms']:,.0f} ms",
                      str(step["shed"]))
    console.print(table)
    b1, b4 = report["bursts"]["1.0"], report["bursts"]["0.25"]
    console.print(f"same mean rate, Poisson vs bursty (B = 0.25): p50 {b1['p50_ms']:,.0f} vs {b4['p50_ms']:,.0f} ms, "
                  f"p99 {b1['p99_ms']:,.0f} vs {b4['p99_ms']:,.0f} ms")
    lag = report["trace"]["send_lag_ms"]
    console.print(f"trace: {report['trace']['requests']} requests at {trace_rate:g}/s, send-time error p50 "
                  f"{lag['p50']:.2f} ms, p99 {lag['p99']:.2f} ms, max {lag['max']:.2f} ms; chart {report['ramp_chart']}")
    write_json(out, report)
    console.print(f"[dim]raw: {out}[/]")


if __name__ == "__main__":
    typer.run(main)
