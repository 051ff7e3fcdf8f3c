"""Benchmark: does `xbench compare` call two runs of the same config inconclusive?

Measures the demo's pipeline point (default model, batch 16, concurrency 4) --runs times back
to back, each in its own process as a user's two runs would be, and compares every run with the
next: the pairs/s and p99 ratios, whether the 95% intervals overlap, and the verdict. A run-to-run
swing that the intervals do not hold shows up here as a false "regression" or "improvement";
how often that happens is the rate of false alarms to expect from `compare` on this machine.

    python benchmarks/compare_noise.py [--runs 4] [--duration 9] [--out /tmp/compare-noise]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from xbench.results.compare import compare, verdict

THRESHOLD = 0.15  # xbench compare's default floor

app = typer.Typer(add_completion=False)


@app.command()
def main(runs: int = typer.Option(4, help="Back-to-back runs (compared pairwise: run k with run k+1)."),
         duration: float = typer.Option(9.0, help="Seconds measured per run (at least; until it converges)."),
         out: Path = typer.Option(Path("/tmp/compare-noise"), help="Folder for the runs' result files.")) -> None:
    console = Console()
    folders = []
    for k in range(runs):
        folder = out / f"run{k}"
        console.print(f"run {k + 1}/{runs} ...")
        subprocess.run([sys.executable, "-m", "xbench", "pipeline-bench", "-b", "16", "-c", "4", "-d", str(duration),
                        "experiment.windows=3", "--warmup", "2", "-o", str(folder)], check=True)
        folders.append(folder)
    table = Table(title=f"{runs} back-to-back runs of one config, each compared with the next (±{THRESHOLD:.0%}, 95% intervals)")
    for col in ("pair", "pairs/s", "B/A", "p99 ms", "B/A ", "verdict"):
        table.add_column(col, justify="left" if col in ("pair", "verdict") else "right")
    alarms = 0
    for k, (a, b) in enumerate(zip(folders, folders[1:])):
        (row,) = compare(a, b, threshold=THRESHOLD)
        alarms += row["regression"] or row["improvement"]
        table.add_row(f"{k + 1} -> {k + 2}", f"{row['a_pairs_per_s']:.1f} -> {row['b_pairs_per_s']:.1f}",
                      f"{row['pairs_ratio']:.2f}", f"{row['a_p99_ms']:.0f} -> {row['b_p99_ms']:.0f}",
                      f"{row['p99_ratio']:.2f}", verdict(row, THRESHOLD))
    console.print(table)
    console.print(f"false alarms: {alarms} of {runs - 1} comparisons of identical configs")


if __name__ == "__main__":
    app()
