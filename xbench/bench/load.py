"""The one load generator: closed loop (C clients) or open loop (Poisson arrivals).

Every measuring command drives its target through `generate`: tokenize-bench a tokenizer
pool, infer-bench the model stage, pipeline-bench the whole pipeline, `load` an HTTP server.
The target is an async `send(i)` that performs request i and returns a `Sent`.

Closed loop: each client sends its next request when the last returns; latency is timed
from the send. Open loop: requests are scheduled at Poisson arrival times whatever the
target does, and latency is timed from the *scheduled* time, so a stalled target cannot
hide its queueing behind slow responses (coordinated omission).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from xbench.bench.stats import Record, summarize
from xbench.errors import XbenchError


class StopLoad(XbenchError):
    """Raised by a target's send when measuring on is pointless (every request is refused as
    wrong): the load stops at once and the run ends with this message."""


@dataclass
class Sent:
    """What one request returned."""

    pairs: int
    stages_s: dict[str, float] = field(default_factory=dict)
    status: int | None = None
    tokens: int = 0
    ok: bool = True
    error: str | None = None


@dataclass
class LoadSpec:
    concurrency: int = 1
    rate: float | None = None  # requests/s; set for open loop
    duration_s: float = 10.0
    warmup_s: float = 2.0
    requests: int | None = None  # closed loop: measure exactly this many requests
    windows: int = 5
    seed: int = 0
    drain_timeout_s: float = 120.0  # open loop: how long in-flight requests may finish


Send = Callable[[int], Awaitable[Sent]]
Progress = Callable[[float], None]  # fraction of the run done, 0..1


async def _timed(send: Send, i: int, start: float) -> Record:
    try:
        sent = await send(i)
    except StopLoad:
        raise
    except Exception as exc:  # a failed request is a result, never the end of the run
        return Record(start, time.perf_counter(), 0, ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
    return Record(start, time.perf_counter(), sent.pairs, ok=sent.ok, stages_s=sent.stages_s,
                  status=sent.status, error=sent.error, tokens=sent.tokens)


async def generate(send: Send, spec: LoadSpec, progress: Progress | None = None,
                   records: list[Record] | None = None) -> dict:
    """Run the load and return the statistics blocks of a result document plus a `load` block;
    every request's record is appended to `records` when given."""
    ticker = asyncio.create_task(_tick(progress, spec)) if progress else None
    sink: list[Record] = [] if records is None else records
    try:
        if spec.rate:
            out = await _open_loop(send, spec, sink)
        else:
            out = await _closed_loop(send, spec, progress, sink)
    finally:
        if ticker:
            ticker.cancel()
    if progress:
        progress(1.0)
    return out


async def _closed_loop(send: Send, spec: LoadSpec, progress: Progress | None, sink: list[Record]) -> dict:
    begin = time.perf_counter()
    measure_from = begin + spec.warmup_s
    stop_at = measure_from + spec.duration_s
    counter = itertools.count()
    records: list[Record] = []
    measured: list[Record] = []  # requests mode: the first N sent after warm-up
    budget = [spec.requests or 0]

    async def client() -> None:
        while True:
            now = time.perf_counter()
            counted = False
            if spec.requests is not None:
                if now >= measure_from:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                    counted = True
            elif now >= stop_at:
                return
            rec = await _timed(send, next(counter), now)
            (measured if counted else records).append(rec)
            if counted and progress and spec.requests:
                progress(min(0.99, len(measured) / spec.requests))

    await asyncio.gather(*(client() for _ in range(spec.concurrency)))
    sink.extend(records + measured)
    if spec.requests is not None:
        t0 = min(r.start for r in measured)
        t1 = max(r.end for r in measured)
        stats = summarize(measured, t0, t1, spec.windows)
    else:
        stats = summarize(records, measure_from, stop_at, spec.windows)
    stats["load"] = {"mode": "closed", "concurrency": spec.concurrency, "warmup_s": spec.warmup_s,
                     "duration_s": spec.duration_s, "requests": spec.requests}
    return stats


async def _open_loop(send: Send, spec: LoadSpec, sink: list[Record]) -> dict:
    assert spec.rate
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    begin = time.perf_counter()
    measure_from = begin + spec.warmup_s
    stop_at = measure_from + spec.duration_s
    tasks: list[asyncio.Task[Record]] = []
    stopped: list[BaseException] = []  # a StopLoad from any request ends the schedule
    scheduled = begin
    for i in itertools.count():
        if scheduled >= stop_at:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if stopped:
            break
        task = asyncio.create_task(_timed(send, i, scheduled))
        task.add_done_callback(lambda t: stopped.extend(
            [t.exception()] if not t.cancelled() and isinstance(t.exception(), StopLoad) else []))
        tasks.append(task)
        scheduled += float(rng.exponential(1.0 / spec.rate))
    done, pending = await asyncio.wait(tasks, timeout=spec.drain_timeout_s) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    if stopped:
        raise stopped[0]
    now = time.perf_counter()
    records = []
    for t in tasks:
        if t in done:
            records.append(t.result())
        else:  # never answered: an error at the drain deadline, not a silent omission
            records.append(Record(now, now, 0, ok=False, error="no response before the drain timeout"))
    sink.extend(records)
    # Every request *scheduled* in the window counts, however late it finished.
    in_window = [r for r in records if measure_from <= r.start < stop_at]
    t1 = max([stop_at] + [r.end for r in in_window])
    stats = summarize(in_window, measure_from, t1, spec.windows)
    stats["load"] = {
        "mode": "open", "target_rate": spec.rate,
        "achieved_send_rate": len(in_window) / spec.duration_s,
        "warmup_s": spec.warmup_s, "duration_s": spec.duration_s,
    }
    return stats


async def _tick(progress: Progress, spec: LoadSpec) -> None:
    begin = time.perf_counter()
    total = spec.warmup_s + spec.duration_s
    while True:
        elapsed = time.perf_counter() - begin
        if spec.requests is None or elapsed < spec.warmup_s:
            progress(min(0.99, elapsed / total))
        await asyncio.sleep(0.2)
