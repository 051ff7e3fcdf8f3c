"""The one load generator: closed loop (C clients) or open loop (Poisson arrivals).

Every measuring command drives its target through `generate`: tokenize-bench a tokenizer
pool, infer-bench the model stage, pipeline-bench the whole pipeline, `load` an HTTP server.
The target is an async `send(i)` that performs request i and returns a `Sent`.

Closed loop: each client sends its next request when the last returns; latency is timed
from the send. Open loop: requests are scheduled at Poisson (or gamma, `burstiness`) arrival
times whatever the target does, and latency is timed from the *scheduled* time, so a stalled
target cannot hide its queueing behind slow responses (coordinated omission). A trace replays
recorded send times the same way.

A point is measured until it converges (`Windows`), as perf_analyzer measures: after the
warm-up, windows close on completions once they are both long enough and hold enough requests;
the point ends when its last three windows agree, or at its time limit, reported unstable with
the spread it reached.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from xbench.bench.stats import Record, even_edges, spread, stability_block, summarize
from xbench.errors import XbenchError


MAX_BACK_OFF_S = 60.0  # a Retry-After longer than this is cut short (measuring N requests)


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
    retry_after_s: float | None = None  # the server shed it and said when to come back
    documents: int = 0  # documents sent, scored or not


@dataclass
class LoadSpec:
    concurrency: int = 1
    rate: float | None = None  # requests/s; set for open loop
    # Open loop: gamma inter-arrival times of shape `burstiness` (1: Poisson; below 1 burstier,
    # above 1 more even), their mean 1 / rate, as vLLM's benchmark draws them.
    burstiness: float = 1.0
    # A trace's send times, seconds from the first: replayed once at those times, every request
    # counted (no warm-up, no convergence: the trace is the experiment).
    schedule: list[float] | None = None
    duration_s: float = 10.0  # the least time measured; each window lasts at least duration_s / windows
    warmup_s: float = 2.0
    requests: int | None = None  # closed loop: measure exactly this many requests, in even windows
    windows: int = 5  # the fewest windows measured
    min_window_requests: int = 20  # a window closes only once this many requests finished in it
    stability_pct: float = 10.0  # the last 3 windows must agree within this
    max_duration_s: float | None = None  # measuring ends here, converged or not; None: 3 x duration_s
    seed: int = 0
    drain_timeout_s: float = 120.0  # open loop: how long in-flight requests may finish
    # Closed loop: a client that is shed waits the server's Retry-After before its next request,
    # as real clients (and the Cohere SDK) do; False counts the 429 and sends the next at once.
    honour_retry_after: bool = True

    @property
    def time_limit_s(self) -> float:
        return max(self.duration_s, 3 * self.duration_s if self.max_duration_s is None else self.max_duration_s)


class Windows:
    """Measurement windows that close on completions, and the point's convergence.

    A window closes at the first completion that finds it at least `duration_s / windows` long
    and holding `min_window_requests` finished requests. Once `windows` have closed, the point
    ends when the last three agree within `stability_pct` on `metric` (closed loop: pairs/s;
    open loop: median latency, since its throughput is the arrival process's). While they
    disagree, each next window must last twice as long and hold twice the requests, so noise
    shrinks as it runs. At the time limit the open window is merged into the last closed one.
    """

    def __init__(self, start: float, spec: LoadSpec, metric: str):
        self.edges = [start]
        self.values: list[float] = []
        self.spec, self.metric = spec, metric
        self.min_s = spec.duration_s / spec.windows
        self.need = spec.min_window_requests
        self.current: list[Record] = []
        self.closed: list[list[Record]] = []
        self.ended: str | None = None  # "converged" or "time limit"

    @property
    def done(self) -> bool:
        return self.ended is not None

    def value(self, records: list[Record], width: float) -> float:
        ok = [r for r in records if r.ok]
        if self.metric == "pairs_per_s":
            return sum(r.pairs for r in ok) / width if width > 0 else 0.0
        return float(np.median([r.latency_s * 1000 for r in ok])) if ok else 0.0

    def add(self, rec: Record) -> None:
        if self.done:
            return
        self.current.append(rec)
        if rec.end - self.edges[-1] >= self.min_s and len(self.current) >= self.need:
            self._close(rec.end)
            if len(self.values) >= self.spec.windows:
                if (s := spread(self.values)) is not None and s <= self.spec.stability_pct / 100:
                    self.ended = "converged"
                else:  # longer windows average out both sampling noise and the machine's slow drifts
                    self.need *= 2
                    self.min_s *= 2

    def _close(self, at: float) -> None:
        self.values.append(self.value(self.current, at - self.edges[-1]))
        self.edges.append(at)
        self.closed.append(self.current)
        self.current = []

    def expire(self, at: float) -> None:
        """The time limit: the open window joins the last closed one (or closes alone)."""
        if self.done:
            return
        if self.closed and self.current:
            last = self.closed.pop() + self.current
            self.values.pop()
            self.edges.pop()
            self.current = last
        if self.current or not self.closed:
            self._close(at)
        self.ended = "time limit"

    def verdict(self) -> dict:
        return stability_block(self.values, self.metric, self.spec.stability_pct / 100, windows=len(self.values),
                               window_s=[b - a for a, b in zip(self.edges, self.edges[1:])],
                               window_requests=[len(w) for w in self.closed], ended=self.ended,
                               min_requests_per_window=self.spec.min_window_requests,
                               time_limit_s=self.spec.time_limit_s)


Send = Callable[[int], Awaitable[Sent]]
Progress = Callable[[float], None]  # fraction of the run done, 0..1


async def _timed(send: Send, i: int, start: float) -> Record:
    sent_at = time.perf_counter()
    try:
        sent = await send(i)
    except StopLoad:
        raise
    except Exception as exc:  # a failed request is a result, never the end of the run
        return Record(start, time.perf_counter(), 0, ok=False, error=f"{type(exc).__name__}: {exc}"[:200],
                      sent=sent_at)
    return Record(start, time.perf_counter(), sent.pairs, ok=sent.ok, stages_s=sent.stages_s,
                  status=sent.status, error=sent.error, tokens=sent.tokens, retry_after_s=sent.retry_after_s,
                  documents=sent.documents, sent=sent_at)


async def _back_off(rec: Record, spec: LoadSpec, until: float) -> None:
    """A closed-loop client told to come back later waits (never past the run's end)."""
    if spec.honour_retry_after and rec.retry_after_s:
        await asyncio.sleep(max(0.0, min(rec.retry_after_s, until - time.perf_counter())))


async def generate(send: Send, spec: LoadSpec, progress: Progress | None = None,
                   records: list[Record] | None = None, measured: list[Record] | None = None) -> dict:
    """Run the load and return the statistics blocks of a result document plus a `load` block;
    every request's record is appended to `records` when given, and the ones the statistics
    count (the measured interval's) to `measured`."""
    ticker = asyncio.create_task(_tick(progress, spec)) if progress else None
    sink: list[Record] = [] if records is None else records
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        if spec.schedule is not None:
            out, counted = await _replay(send, spec, sink)
        elif spec.rate:
            out, counted = await _open_loop(send, spec, sink)
        else:
            out, counted = await _closed_loop(send, spec, progress, sink)
    finally:
        if ticker:
            ticker.cancel()
    if progress:
        progress(1.0)
    if measured is not None:
        measured.extend(counted)
    # The generator's own appetite: on a machine it shares with the server, a generator near one
    # core is part of what was measured.
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    out["load"]["generator_cpu"] = {"seconds": cpu, "cores": cpu / wall if wall > 0 else 0.0}
    return out


Counted = tuple[dict, list[Record]]  # the statistics, and the records they count


async def _closed_loop(send: Send, spec: LoadSpec, progress: Progress | None, sink: list[Record]) -> Counted:
    begin = time.perf_counter()
    measure_from = begin + spec.warmup_s
    if spec.requests is not None:
        return await _closed_loop_requests(send, spec, progress, sink, measure_from)
    counter = itertools.count()
    records: list[Record] = []
    windows = Windows(measure_from, spec, "pairs_per_s")

    async def client() -> None:
        while not windows.done:
            rec = await _timed(send, next(counter), time.perf_counter())
            records.append(rec)
            if rec.end >= measure_from:
                windows.add(rec)
            await _back_off(rec, spec, measure_from + spec.time_limit_s)

    async def time_limit() -> None:
        await asyncio.sleep(max(0.0, measure_from + spec.time_limit_s - time.perf_counter()))
        windows.expire(time.perf_counter())

    limit = asyncio.create_task(time_limit())
    try:
        await asyncio.gather(*(client() for _ in range(spec.concurrency)))
    finally:
        limit.cancel()
    sink.extend(records)
    stats = summarize(records, windows.edges)
    stats["stability"] = {**stats["stability"], **windows.verdict()}
    stats["load"] = {"mode": "closed", "concurrency": spec.concurrency, "warmup_s": spec.warmup_s,
                     "duration_s": spec.duration_s, "measured_s": windows.edges[-1] - measure_from,
                     "honour_retry_after": spec.honour_retry_after}
    return stats, [r for r in records if measure_from <= r.end <= windows.edges[-1]]


async def _closed_loop_requests(send: Send, spec: LoadSpec, progress: Progress | None, sink: list[Record],
                                measure_from: float) -> Counted:
    """Exactly `spec.requests` requests, the first sent after the warm-up, in even windows."""
    assert spec.requests is not None
    counter = itertools.count()
    warmup: list[Record] = []
    measured: list[Record] = []
    budget = [spec.requests]

    async def client() -> None:
        while True:
            now = time.perf_counter()
            counted = now >= measure_from
            if counted:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            rec = await _timed(send, next(counter), now)
            (measured if counted else warmup).append(rec)
            if counted and progress:
                progress(min(0.99, len(measured) / spec.requests))
            await _back_off(rec, spec, rec.end + MAX_BACK_OFF_S)

    await asyncio.gather(*(client() for _ in range(spec.concurrency)))
    sink.extend(warmup + measured)
    t0 = min(r.start for r in measured)
    t1 = max(r.end for r in measured)
    stats = summarize(measured, even_edges(t0, t1, spec.windows))
    stats["load"] = {"mode": "closed", "concurrency": spec.concurrency, "warmup_s": spec.warmup_s,
                     "requests": spec.requests, "measured_s": t1 - t0, "honour_retry_after": spec.honour_retry_after}
    return stats, measured


async def _open_loop(send: Send, spec: LoadSpec, sink: list[Record]) -> Counted:
    assert spec.rate
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    begin = time.perf_counter()
    measure_from = begin + spec.warmup_s
    limit_at = measure_from + spec.time_limit_s
    windows = Windows(measure_from, spec, "latency_p50_ms")
    tasks: list[asyncio.Task[Record]] = []
    stopped: list[BaseException] = []  # a StopLoad from any request ends the schedule

    def finished(task: asyncio.Task[Record]) -> None:
        if task.cancelled():
            return
        if isinstance(task.exception(), StopLoad):
            stopped.append(task.exception())  # type: ignore[arg-type]
        elif task.exception() is None and task.result().start >= measure_from:
            windows.add(task.result())

    scheduled = begin
    for i in itertools.count():
        if scheduled >= limit_at:
            windows.expire(limit_at)
        if windows.done or stopped:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
            if windows.done or stopped:
                break
        task = asyncio.create_task(_timed(send, i, scheduled))
        task.add_done_callback(finished)
        tasks.append(task)
        scheduled += float(rng.exponential(1.0 / spec.rate) if spec.burstiness == 1.0  # the same Poisson stream
                           else rng.gamma(spec.burstiness, 1.0 / (spec.rate * spec.burstiness)))
    stop_at = max(windows.edges[-1], min(time.perf_counter(), limit_at))  # the schedule's end
    records = await _drain(tasks, spec.drain_timeout_s)
    sink.extend(records)
    # Every request *scheduled* while measuring counts, however late it finished: the last
    # window stretches to the last answer.
    in_window = [r for r in records if measure_from <= r.start < stop_at]
    edges = [*windows.edges[:-1], max([stop_at] + [r.end for r in in_window])]
    stats = summarize(in_window, edges)
    stats["stability"] = {**stats["stability"], **windows.verdict()}
    stats["load"] = {
        "mode": "open", "target_rate": spec.rate, "burstiness": spec.burstiness, "send_lag_ms": _send_lag(in_window),
        "achieved_send_rate": len(in_window) / max(stop_at - measure_from, 1e-9),
        "warmup_s": spec.warmup_s, "duration_s": spec.duration_s, "measured_s": stop_at - measure_from,
    }
    return stats, in_window


async def _replay(send: Send, spec: LoadSpec, sink: list[Record]) -> Counted:
    """A trace at its own times: request i is due at `schedule[i]` from the start, whatever the
    target does, and its latency counts from then (as in the open loop)."""
    assert spec.schedule is not None
    begin = time.perf_counter() + 0.05  # room to schedule the first without a late start
    tasks: list[asyncio.Task[Record]] = []
    for i, offset in enumerate(spec.schedule):
        delay = begin + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_timed(send, i, begin + offset)))
    records = await _drain(tasks, spec.drain_timeout_s)
    sink.extend(records)
    stats = summarize(records, even_edges(begin, max(r.end for r in records), spec.windows))
    stats["load"] = {"mode": "trace", "requests": len(records), "span_s": spec.schedule[-1],
                     "send_lag_ms": _send_lag(records)}
    return stats, records


async def _drain(tasks: list[asyncio.Task[Record]], timeout_s: float) -> list[Record]:
    """The records of scheduled requests once they have answered or the drain timeout has passed
    (a request never answered is an error at the deadline, not a silent omission); a StopLoad
    from any of them ends the run."""
    done, pending = await asyncio.wait(tasks, timeout=timeout_s) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    for t in done:
        if isinstance(t.exception(), StopLoad):
            raise t.exception()  # type: ignore[misc]
    now = time.perf_counter()
    return [t.result() if t in done else Record(now, now, 0, ok=False, error="no response before the drain timeout")
            for t in tasks]


def _send_lag(records: list[Record]) -> dict | None:
    """How late requests were sent after they were due (open loop, trace), in milliseconds."""
    lag = [(r.sent - r.start) * 1000 for r in records if r.sent is not None]
    return {"p50": float(np.percentile(lag, 50)), "p99": float(np.percentile(lag, 99)), "max": max(lag)} if lag else None


async def _tick(progress: Progress, spec: LoadSpec) -> None:
    """Time-based progress: 90% at the least measuring time, the rest while it extends."""
    begin = time.perf_counter()
    least = spec.warmup_s + spec.duration_s
    most = spec.warmup_s + spec.time_limit_s
    while True:
        elapsed = time.perf_counter() - begin
        if spec.requests is None:
            extra = max(0.0, elapsed - least) / max(most - least, 1e-9)
            progress(min(0.99, 0.9 * min(elapsed, least) / least + 0.09 * extra))
        elif elapsed < spec.warmup_s:
            progress(min(0.99, elapsed / least))
        await asyncio.sleep(0.2)
