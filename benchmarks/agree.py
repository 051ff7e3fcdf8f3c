"""Benchmark: do `xbench load` and NVIDIA AIPerf read the same server the same way?

One `xbench serve` (default config, or the overrides given), and two load tools sending the same
payloads: AIPerf's cohere-rankings endpoint with its own synthetic rankings, and `xbench load`
replaying AIPerf's own requests (its inputs.json) with `-b recorded`. Rounds alternate. Where the
machine has two cores or more, the server is pinned to core 0 and each tool to core 1
(`taskset`), so neither tool takes the server's CPU; each tool's own CPU seconds are reported.

    make aiperf && python benchmarks/agree.py [--requests 60] [--rounds 2] [--concurrency 4] [--documents 16]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from xbench.checkpoints import resolve_model
from xbench.results.store import environment, write_json
from serving import start_server

console = Console(width=150)
AIPERF = Path(__file__).parents[1] / ".venv-aiperf" / "bin" / "aiperf"
SERVED = "xbench/minilm-l6-seeded"


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run a tool to its end; its CPU seconds (children included)."""
    before = children_cpu_s()
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result, children_cpu_s() - before


def main(
    overrides: Optional[List[str]] = typer.Argument(None),
    requests: int = typer.Option(60, help="Requests measured per tool per round."),
    rounds: int = typer.Option(2),
    concurrency: int = typer.Option(4),
    documents: int = typer.Option(16, help="Documents a request (AIPerf's passages mean, stddev 0)."),
    doc_tokens: int = typer.Option(60, help="Tokens a document (AIPerf's passage length)."),
    warmup: int = typer.Option(8, help="Warm-up requests (AIPerf) / about as many seconds' worth (xbench)."),
    pin: bool = typer.Option(True, help="Pin the server to core 0 and each tool to core 1."),
    out: Path = typer.Option(Path("results/benchmarks/agree.json"), "--out", "-o"),
) -> None:
    if not AIPERF.is_file():
        raise SystemExit(f"AIPerf is not installed at {AIPERF}: run `make aiperf`")
    pin = pin and (os.cpu_count() or 1) >= 2
    tool_cpu = ["taskset", "-c", "1"] if pin else []
    tokenizer = str(resolve_model("default").path)
    work = Path(tempfile.mkdtemp(prefix="xbench-agree-"))
    server = start_server(list(overrides or []))
    if pin:  # every thread of the server, not only its main one
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(server.proc.pid)], check=True, capture_output=True)
    # AIPerf finds a local tokenizer folder only with the hub switched on (nothing is fetched).
    aiperf_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    runs: dict[str, list[dict]] = {"aiperf": [], "xbench load": []}
    payloads = work / "payloads.jsonl"
    try:
        for r in range(rounds):
            art = work / f"aiperf-{r}"
            with console.status(f"round {r + 1}/{rounds}: AIPerf ..."):
                _, cpu = timed([*tool_cpu, str(AIPERF), "profile", "--model", SERVED, "--url", server.url,
                                "--tokenizer", tokenizer, "--endpoint-type", "cohere-rankings",
                                "--concurrency", str(concurrency), "--request-count", str(requests),
                                "--warmup-request-count", str(warmup), "--rankings-passages-mean", str(documents),
                                "--rankings-passages-stddev", "0", "--rankings-passages-prompt-token-mean", str(doc_tokens),
                                "--rankings-query-prompt-token-mean", "8", "--random-seed", "7", "--ui-type", "none",
                                "--artifact-dir", str(art)], env=aiperf_env)
            summary = json.loads((art / "profile_export_aiperf.json").read_text())
            runs["aiperf"].append({"requests_per_s": summary["request_throughput"]["avg"],
                                   "p50_ms": summary["request_latency"]["p50"], "cpu_s": cpu})
            if not payloads.exists():  # AIPerf's own requests, for xbench load to send as they are
                sessions = json.loads((art / "inputs.json").read_text())["data"]
                payloads.write_text("".join(json.dumps({"query": p["query"], "documents": p["documents"]}) + "\n"
                                            for s in sessions for p in s["payloads"]))
            result_file = work / f"xbench-{r}.json"
            with console.status(f"round {r + 1}/{rounds}: xbench load ..."):
                _, cpu = timed([*tool_cpu, sys.executable, "-m", "xbench", "load", server.url, "--model", SERVED,
                                "--data", str(payloads), "-b", "recorded", "-c", str(concurrency),
                                "-n", str(requests), "--warmup", str(max(1, warmup // 3)), "-o", str(result_file)])
            doc = json.loads(result_file.read_text())
            runs["xbench load"].append({"requests_per_s": doc["summary"]["requests_per_s"],
                                        "p50_ms": doc["latency_ms"]["p50"], "cpu_s": cpu})
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"xbench load and AIPerf against one xbench serve, {concurrency} clients, {documents} documents "
                        f"of {doc_tokens} tokens, same payloads" + (", server on core 0, tools on core 1" if pin else ""))
    for col in ("tool", "requests/s (rounds)", "p50 ms (rounds)", "CPU s (rounds)", "CPU s per request"):
        table.add_column(col, justify="left" if col == "tool" else "right")
    means = {}
    for tool, rs in runs.items():
        means[tool] = {k: statistics.fmean(x[k] for x in rs) for k in ("requests_per_s", "p50_ms", "cpu_s")}
        table.add_row(tool, " ".join(f"{x['requests_per_s']:.2f}" for x in rs), " ".join(f"{x['p50_ms']:,.0f}" for x in rs),
                      " ".join(f"{x['cpu_s']:.1f}" for x in rs), f"{means[tool]['cpu_s'] / (requests + warmup):.3f}")
    console.print(table)
    rate = means["xbench load"]["requests_per_s"] / means["aiperf"]["requests_per_s"]
    p50 = means["xbench load"]["p50_ms"] / means["aiperf"]["p50_ms"]
    console.print(f"xbench load / AIPerf: requests/s {rate:.3f}, p50 {p50:.3f}")
    write_json(out, {"env": environment(), "pinned": pin, "concurrency": concurrency, "documents": documents,
                     "doc_tokens": doc_tokens, "requests": requests, "runs": runs, "ratio": {"requests_per_s": rate,
                                                                                            "p50": p50}})
    console.print(f"[dim]raw: {out}[/]")


if __name__ == "__main__":
    typer.run(main)
