"""The load generator measures a point until it converges, and says so when it cannot."""

import asyncio

import pytest

from xbench.bench.load import LoadSpec, Sent, Windows, generate
from xbench.bench.stats import Record


def steady(start: float, n: int, every: float, pairs: int = 4) -> list[Record]:
    return [Record(start + i * every, start + (i + 1) * every, pairs) for i in range(n)]


def test_windows_close_by_time_and_count_and_converge_on_agreement():
    spec = LoadSpec(duration_s=3.0, windows=3, min_window_requests=20)
    w = Windows(0.0, spec, "pairs_per_s")
    for rec in steady(0.0, 400, 0.01):  # 100 req/s: 1 s windows hold 100 requests
        w.add(rec)
    assert w.ended == "converged"
    assert w.edges == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert w.values == pytest.approx([400.0] * 3)
    # slow requests: a window stays open until it holds 20, however long that takes
    w = Windows(0.0, spec, "pairs_per_s")
    for rec in steady(0.0, 60, 0.1):
        w.add(rec)
    assert w.edges == pytest.approx([0.0, 2.0, 4.0, 6.0]) and w.ended == "converged"


def test_disagreeing_windows_grow_and_the_time_limit_merges_the_open_one():
    spec = LoadSpec(duration_s=0.3, windows=3, min_window_requests=10)
    w = Windows(0.0, spec, "pairs_per_s")
    t = 0.0
    for k in range(3):  # 10 req/s, then 20, then 10: windows disagree
        every = 0.1 if k != 1 else 0.05
        for _ in range(10):
            t += every
            w.add(Record(t - every, t, 1))
    assert len(w.values) == 3 and not w.done and w.need == 20 and w.min_s == pytest.approx(0.2)
    for _ in range(5):  # 5 more, short of the 20 the next window needs
        t += 0.1
        w.add(Record(t - 0.1, t, 1))
    w.expire(t)
    verdict = w.verdict()
    assert w.ended == "time limit" and verdict["windows"] == 3 and not verdict["stable"]
    assert verdict["window_requests"] == [10, 10, 15] and w.edges[-1] == pytest.approx(t)
    assert verdict["spread_pct"] > 10


def run(send, spec):
    return asyncio.run(generate(send, spec))


def test_a_steady_target_converges_at_the_least_duration():
    async def send(i: int) -> Sent:
        await asyncio.sleep(0.005)
        return Sent(pairs=2)

    out = run(send, LoadSpec(concurrency=2, duration_s=0.6, warmup_s=0.1, windows=3, min_window_requests=5))
    st = out["stability"]
    assert st["ended"] == "converged" and st["stable"] and st["windows"] == 3
    assert 0.6 <= out["load"]["measured_s"] < 1.2
    lo, hi = out["confidence"]["pairs_per_s"]
    assert lo <= out["summary"]["pairs_per_s"] <= hi


def test_an_erratic_target_runs_to_its_time_limit_and_says_it_is_unstable():
    async def send(i: int) -> Sent:
        await asyncio.sleep(0.002 if (i // 25) % 2 else 0.03)  # fast and slow phases
        return Sent(pairs=1)

    out = run(send, LoadSpec(concurrency=1, duration_s=0.6, max_duration_s=1.5, warmup_s=0, windows=3,
                             min_window_requests=20))
    st = out["stability"]
    assert st["ended"] == "time limit" and not st["stable"] and st["spread_pct"] > 10
    assert 1.4 <= out["load"]["measured_s"] <= 1.7


def test_open_loop_judges_latency_and_counts_every_scheduled_request():
    async def send(i: int) -> Sent:
        await asyncio.sleep(0.01)
        return Sent(pairs=1)

    out = run(send, LoadSpec(rate=100, duration_s=0.9, warmup_s=0.1, windows=3, min_window_requests=10))
    st = out["stability"]
    assert st["metric"] == "latency_p50_ms" and st["ended"] == "converged"
    assert out["summary"]["requests"] == pytest.approx(100 * out["load"]["measured_s"], rel=0.35)
    assert out["summary"]["errors"] == 0
