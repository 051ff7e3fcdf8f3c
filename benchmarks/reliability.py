"""Benchmark: does `xbench serve` hold under abuse?

Each case starts a real server on a loopback port, is bounded in time, and ends in one table row:
what was tried, the statuses it got, requests lost (sent and never answered), the server's RSS
before and after, and how long it took to get back to normal.

  overload   capacity measured closed-loop, then open-loop arrivals at 4x capacity for
             --duration s; the same run with and without the queue-wait bound
             (server.max_queue_wait_ms vs 0): share of accepted requests whose queue wait stayed
             within the bound, 429 latency, and time until a probe's latency is normal again
  slow       clients that trickle a body, never finish their headers, or say nothing, more of
             them than there are request slots, while a legitimate client keeps sending
  storm      large requests (a 16 KB query x 200 long documents; 1,000 over-long pairs with
             truncation off): RSS after vs before
  shutdown   keep-alive clients looping across SIGTERM; then a backlog longer than the grace
             period: every request answered, the process gone within the grace
  soak       open loop at 60% of capacity for --soak s: errors and RSS drift

    python benchmarks/reliability.py [--cases overload,slow,storm,shutdown,soak] [--duration 30] [overrides]
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, List, Optional

import httpx
import numpy as np
import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from xbench.bench.http import HttpTarget
from xbench.bench.load import LoadSpec, generate
from xbench.bench.stats import Record, latency_summary
from xbench.config import compose_config
from xbench.results.store import environment, write_json
from serving import RunningServer, closed_by_server, start_server
from xbench.workload import make_workload

console = Console(width=150)
DOCS = 16  # documents per request, as in the overload probe


def statuses(records: list[Record]) -> dict[str, int]:
    return dict(Counter(str(r.status) if r.status else "lost" for r in records))


def lost(records: list[Record]) -> int:
    return sum(1 for r in records if r.status is None)


def run_load(server: RunningServer, workload: Any, spec: LoadSpec) -> tuple[dict, list[Record]]:
    records: list[Record] = []

    async def go() -> dict:
        target = HttpTarget(server.url, "cohere", timeout_s=120)
        await target.open()
        try:
            return await generate(target.sender(workload, DOCS), spec, records=records)
        finally:
            await target.aclose()

    return asyncio.run(go()), records


def capacity_req_s(server: RunningServer, workload: Any) -> float:
    """Requests/s the server completes with 8 clients in a closed loop: 48 requests timed
    after a warm-up (a count, not a window: completions come in bursts of mixed batches)."""
    with console.status("measuring capacity (closed loop, 8 clients, 48 requests) ..."):
        stats, _ = run_load(server, workload, LoadSpec(concurrency=8, requests=48, warmup_s=3))
    return stats["summary"]["requests_per_s"]


def server_share_within(server: RunningServer, status: str, seconds: float) -> float | None:
    """Of the requests the server answered with `status`, the share it answered within `seconds`
    by its own clock (xbench_request_duration_seconds), so the client's CPU share on a small
    machine does not count."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    within = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "xbench_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("status") == status:
                if sample.labels["le"] == "+Inf":
                    total += sample.value
                elif float(sample.labels["le"]) == seconds:
                    within += sample.value
    return within / total if total else None


def idle_latency_s(server: RunningServer, body: dict) -> float:
    with httpx.Client(timeout=60) as c:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            c.post(server.url + "/v1/rerank", json=body).raise_for_status()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def recovery_s(server: RunningServer, body: dict, normal_s: float, start_at: float, limit_s: float = 90) -> float | None:
    """Seconds from `start_at` (perf_counter) until a lone request is answered 200 within twice
    the idle latency; None if not within limit_s."""
    time.sleep(max(0.0, start_at - time.perf_counter()))
    with httpx.Client(timeout=limit_s) as c:
        while time.perf_counter() - start_at < limit_s:
            t0 = time.perf_counter()
            r = c.post(server.url + "/v1/rerank", json=body)
            if r.status_code == 200 and time.perf_counter() - t0 <= max(2 * normal_s, normal_s + 0.1):
                return t0 - start_at
            time.sleep(0.25)
    return None


def overload(overrides: list[str], workload: Any, duration: float, rows: list, doc: dict) -> None:
    cfg = compose_config(overrides)
    bound_ms = float(cfg.server.max_queue_wait_ms)
    probe = {"query": "what is the capital of france", "documents": ["Paris is the capital of France."] * DOCS}
    capacity = None
    for label, extra in ((f"bounded ({bound_ms:.0f} ms)", []), ("unbounded (0)", ["server.max_queue_wait_ms=0"])):
        server = start_server([*overrides, *extra])
        try:
            normal = idle_latency_s(server, probe)
            capacity = capacity or capacity_req_s(server, workload)
            rss_before = server.rss_mb()
            spec = LoadSpec(rate=4 * capacity, duration_s=duration, max_duration_s=duration, warmup_s=0,
                            drain_timeout_s=120)
            stop_at = time.perf_counter() + duration
            recovered: dict[str, float | None] = {}
            prober = threading.Thread(target=lambda: recovered.update(s=recovery_s(server, probe, normal, stop_at)))
            prober.start()
            with console.status(f"overload {label}: {4 * capacity:.1f} req/s for {duration:.0f} s ..."):
                _, records = run_load(server, workload, spec)
                prober.join()
            rss_after = server.rss_mb()
            shed_fast = server_share_within(server, "429", 0.05)
        finally:
            server.stop()
        ok = [r for r in records if r.status == 200]
        shed = [r for r in records if r.status == 429]
        within = sum(1 for r in ok if r.stages_s.get("queue", 0) * 1000 <= bound_ms) / max(1, len(ok))
        p99_429 = latency_summary([r.latency_s for r in shed])["p99"]
        p99_ok = latency_summary([r.latency_s for r in ok])["p99"]
        rec = recovered.get("s")
        rows.append((f"overload 4x, {label}", len(records), statuses(records), lost(records), rss_before, rss_after,
                     f"recovered {rec:.1f} s after" if rec is not None else "not recovered in 90 s",
                     f"{within:.0%} of 200s queued <= {bound_ms:.0f} ms; 200 p99 {p99_ok / 1000:.1f} s; "
                     + (f"429 p99 {p99_429:.0f} ms at the client, {shed_fast:.0%} within 50 ms at the server"
                        if p99_429 is not None else "no 429")))
        doc.setdefault("overload", {})[label] = {
            "capacity_req_s": capacity, "rate_req_s": 4 * capacity, "statuses": statuses(records),
            "accepted_within_bound": within, "p99_ms_200": p99_ok, "p99_ms_429": p99_429,
            "share_429_within_50ms_server": shed_fast,
            "recovery_s": rec, "rss_mb": [rss_before, rss_after], "idle_latency_ms": normal * 1000}


def slow_clients(overrides: list[str], rows: list, doc: dict, hold_s: float = 14.0) -> None:
    slots = 64
    server = start_server([*overrides, f"server.max_concurrent_requests={slots}"])
    cfg = compose_config(overrides)
    body = {"query": "q", "documents": ["a short document"] * 4}
    try:
        rss_before = server.rss_mb()
        silent = [server.connect() for _ in range(200)]
        slowloris = [server.connect() for _ in range(100)]
        tricklers = [server.connect() for _ in range(slots + 8)]
        for sock in slowloris:
            sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\n")
        for sock in tricklers:
            sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n{\"query\": ")
        codes: Counter = Counter()
        t0 = time.perf_counter()
        with console.status(f"slow clients: {len(silent) + len(slowloris) + len(tricklers)} held for {hold_s:.0f} s ..."), \
                httpx.Client(timeout=30) as c:
            while time.perf_counter() - t0 < hold_s:
                for sock in slowloris + tricklers:  # a byte now and then keeps an idle timer from firing
                    try:
                        sock.send(b"X" if sock in slowloris else b" ")
                    except OSError:
                        pass
                try:
                    codes[str(c.post(server.url + "/v1/rerank", json=body).status_code)] += 1
                except httpx.HTTPError:
                    codes["lost"] += 1
                time.sleep(0.2)
        cut = [closed_by_server(s, 1.0) is not None for s in silent + slowloris + tricklers]
        rss_after = server.rss_mb()
    finally:
        for sock in silent + slowloris + tricklers:
            sock.close()
        server.stop()
    timeouts = f"header {cfg.server.header_timeout_s:g} s, body {cfg.server.body_timeout_s:g} s"
    rows.append((f"slow clients vs {slots} slots", sum(codes.values()), dict(codes), codes.get("lost", 0),
                 rss_before, rss_after, f"{sum(cut)}/{len(cut)} slow sockets cut",
                 f"{len(tricklers)} body tricklers, {len(slowloris)} slowloris, {len(silent)} silent; {timeouts}"))
    doc["slow_clients"] = {"legit_statuses": dict(codes), "slow_sockets": len(cut), "cut_by_server": sum(cut),
                           "hold_s": hold_s}


def storm(overrides: list[str], rows: list, doc: dict) -> None:
    server = start_server([*overrides, "server.max_queue_wait_ms=0"])
    try:
        httpx.post(server.url + "/v1/rerank", json={"query": "q", "documents": ["a b c"] * 16}, timeout=60)
        before = server.rss_mb()
        query = "query words " * 1300
        long = [f"document {i} " + "word " * 300 for i in range(200)]

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=600) as c:
                return await asyncio.gather(
                    c.post(server.url + "/v1/rerank", json={"query": query, "documents": long}),
                    *(c.post(server.url + "/rerank", json={"query": query, "texts": long * 5, "truncate": False})
                      for _ in range(4)))

        t0 = time.perf_counter()
        with console.status("storm: large requests ..."):
            answers = asyncio.run(go())
        took = time.perf_counter() - t0
        time.sleep(1.0)
        after = server.rss_mb()
    finally:
        server.stop()
    codes = dict(Counter(str(r.status_code) for r in answers))
    rows.append(("storm of large requests", len(answers), codes, 0, before, after, f"answered in {took:.1f} s",
                 "16 KB query x 200 long docs; 4 x 1,000 over-long pairs, truncate off"))
    doc["storm"] = {"statuses": codes, "rss_mb": [before, after], "seconds": took}


def shutdown(overrides: list[str], rows: list, doc: dict) -> None:
    # Keep-alive clients looping across SIGTERM.
    server = start_server(overrides)
    outcomes: Counter = Counter()
    body = {"query": "q", "documents": [f"document {i} " + "word " * 60 for i in range(DOCS)]}

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while True:
                try:
                    r = c.post(server.url + "/v1/rerank", json=body)
                except httpx.ConnectError:
                    outcomes["refused"] += 1
                    return
                except httpx.HTTPError:
                    outcomes["lost"] += 1
                    return
                outcomes[f"{r.status_code}{' close' if r.headers.get('connection') == 'close' else ''}"] += 1
                if r.status_code == 503:
                    time.sleep(int(r.headers.get("retry-after", 1)))

    rss_before = server.rss_mb()
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    rss_after = server.rss_mb()
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    code = server.proc.wait(60)
    exited = time.perf_counter() - t0
    server.stop()
    rows.append(("SIGTERM, 8 keep-alive clients", sum(v for k, v in outcomes.items() if k != "refused"),
                 dict(outcomes), outcomes.get("lost", 0), rss_before, rss_after,
                 f"exit {code} after {exited:.1f} s", "clients honour Retry-After; refused = after exit"))
    doc["shutdown_keep_alive"] = {"outcomes": dict(outcomes), "exit_code": code, "exit_s": exited}

    # A backlog longer than the grace period.
    grace = 5
    server = start_server([*overrides, f"server.shutdown_grace_s={grace}", "server.max_queue_wait_ms=0"])
    long = [f"document {i} " + "word " * 300 for i in range(100)]

    async def backlog() -> tuple[list, float]:
        async with httpx.AsyncClient(timeout=120) as c:
            sends = [asyncio.ensure_future(c.post(server.url + "/rerank", json={"query": "q", "texts": long}))
                     for _ in range(8)]
            await asyncio.sleep(2.0)
            server.proc.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*sends, return_exceptions=True)
            return answers, time.perf_counter()

    rss_before = server.rss_mb()
    t0 = time.perf_counter() + 2.0
    with console.status(f"shutdown with a backlog past the {grace} s grace ..."):
        answers, _ = asyncio.run(backlog())
        code = server.proc.wait(60)
    exited = time.perf_counter() - t0
    server.stop()
    codes = Counter(str(a.status_code) if isinstance(a, httpx.Response) else "lost" for a in answers)
    rows.append((f"SIGTERM, backlog > {grace} s grace", len(answers), dict(codes), codes.get("lost", 0), rss_before,
                 None, f"exit {code} after {exited:.1f} s", "unscored requests answered 503 before the grace ends"))
    doc["shutdown_backlog"] = {"statuses": dict(codes), "exit_code": code, "exit_s": exited, "grace_s": grace}


def soak(overrides: list[str], workload: Any, seconds: float, rows: list, doc: dict) -> None:
    server = start_server(overrides)
    try:
        rate = 0.6 * capacity_req_s(server, workload)
        before = server.rss_mb()
        with console.status(f"soak: {rate:.1f} req/s for {seconds:.0f} s ..."):
            stats, records = run_load(server, workload, LoadSpec(rate=rate, duration_s=seconds,
                                                                  max_duration_s=seconds, warmup_s=0))
        after = server.rss_mb()
    finally:
        server.stop()
    p99 = stats["latency_ms"]["p99"]
    rows.append((f"soak, 60% load, {seconds:.0f} s", len(records), statuses(records), lost(records), before, after,
                 f"p99 {p99:.0f} ms", f"{rate:.1f} req/s of {DOCS} docs"))
    doc["soak"] = {"rate_req_s": rate, "statuses": statuses(records), "rss_mb": [before, after], "p99_ms": p99}


def main(
    overrides: Optional[List[str]] = typer.Argument(None),
    cases: str = typer.Option("overload,slow,storm,shutdown,soak", help="Comma-separated cases to run."),
    duration: float = typer.Option(30.0, help="Overload: seconds of arrivals at 4x capacity."),
    soak_s: float = typer.Option(60.0, "--soak", help="Soak: seconds at 60% of capacity."),
    out: Path = typer.Option(Path("results/benchmarks/reliability.json"), "--out", "-o"),
) -> None:
    overrides = list(overrides or [])
    chosen = [c.strip() for c in cases.split(",") if c.strip()]
    unknown = set(chosen) - {"overload", "slow", "storm", "shutdown", "soak"}
    if unknown:
        raise typer.BadParameter(f"unknown case(s) {', '.join(sorted(unknown))}", param_hint="--cases")
    workload = make_workload(None, compose_config(overrides))
    rows: list = []
    doc: dict = {"env": environment(), "overrides": overrides}
    for case in chosen:
        if case == "overload":
            overload(overrides, workload, duration, rows, doc)
        elif case == "slow":
            slow_clients(overrides, rows, doc)
        elif case == "storm":
            storm(overrides, rows, doc)
        elif case == "shutdown":
            shutdown(overrides, rows, doc)
        else:
            soak(overrides, workload, soak_s, rows, doc)
    table = Table(title="xbench serve under abuse")
    for col in ("case", "tried", "statuses", "lost", "RSS MB before → after", "recovery", "notes"):
        table.add_column(col, justify="right" if col in ("tried", "lost") else "left")
    for case, tried, codes, n_lost, before, after, recovery, notes in rows:
        memory = f"{before:.0f} → {after:.0f}" if after is not None else f"{before:.0f} → (exited)"
        table.add_row(case, str(tried), ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())), str(n_lost),
                      memory, recovery, notes)
    console.print(table)
    doc["rows"] = [dict(zip(("case", "tried", "statuses", "lost", "rss_before_mb", "rss_after_mb", "recovery", "notes"),
                            row)) for row in rows]
    console.print(f"wrote {write_json(out, doc)}")


if __name__ == "__main__":
    typer.run(main)
