"""Capacity search (`xbench load --slo`) against fake targets with known latency curves."""

import numpy as np
import pytest

from xbench.bench.slo import CEILING, MAX_PROBES, RESOLUTION, search_rate

CAPACITY = 100.0


def queue_latency_ms(rate: float, service_ms: float = 20.0) -> float:
    """An M/M/1-like curve: latency grows without bound as the rate nears capacity."""
    return float("inf") if rate >= CAPACITY else service_ms / (1 - rate / CAPACITY)


def bound_for(boundary_rate: float) -> float:
    return queue_latency_ms(boundary_rate)


@pytest.mark.parametrize("boundary", [70.0, 20.0, 3.0])
def test_the_search_brackets_downward_then_bisects_to_the_boundary(boundary):
    # boundary 20 and 3: the first probe (capacity / 2) misses, the case that used to re-measure
    # the same rate over and over.
    bound = bound_for(boundary)
    search = search_rate(lambda r: queue_latency_ms(r) <= bound, CAPACITY)
    rates = [r for r, _ in search.tried]
    assert len(set(rates)) == len(rates), "a rate was measured twice"
    assert search.best is not None and search.best <= boundary
    assert search.best >= boundary * (1 - 2 * RESOLUTION)
    missed_above = min(r for r, met in search.tried if not met)
    assert missed_above > search.best and (missed_above - search.best) <= RESOLUTION * missed_above * 2


def test_no_rate_meets_a_bound_below_the_idle_latency():
    search = search_rate(lambda r: queue_latency_ms(r) <= 5.0, CAPACITY)
    assert search.best is None
    assert all(not met for _, met in search.tried)
    assert [r for r, _ in search.tried] == [50.0, 25.0, 12.5, 6.25, 3.125, 1.5625]


def test_every_rate_meeting_the_bound_ends_near_the_ceiling():
    search = search_rate(lambda r: True, CAPACITY)
    assert search.best >= CAPACITY * CEILING * (1 - RESOLUTION)
    assert len(search.tried) <= MAX_PROBES


def test_a_noisy_boundary_ends_within_the_probe_budget_on_a_rate_that_met():
    rng = np.random.default_rng(0)
    bound = bound_for(60.0)

    def noisy(rate: float) -> bool:
        return queue_latency_ms(rate) * rng.uniform(0.8, 1.25) <= bound

    for _ in range(20):
        search = search_rate(noisy, CAPACITY)
        assert len(search.tried) <= MAX_PROBES
        assert search.best in {r for r, met in search.tried if met}
        assert 30.0 <= search.best <= 80.0


def test_the_search_can_hold_a_goodput_share():
    from xbench.bench.slo import parse_slo
    from xbench.errors import ConfigError

    assert parse_slo("goodput=0.99") == ("goodput", 0.99) and parse_slo("p99_ms=500") == ("p99", 500.0)
    for bad in ("goodput=1.5", "goodput=0", "goodput=most"):
        with pytest.raises(ConfigError, match="goodput=F"):
            parse_slo(bad)


@pytest.mark.slow
def test_a_goodput_search_against_a_real_server(tmp_path, tiny_model):
    import json
    import subprocess
    import sys

    from serving import start_server

    s = start_server([f"model_pool.instances.0.name={tiny_model}"])
    try:
        without = subprocess.run([sys.executable, "-m", "xbench", "load", s.url, "--slo", "goodput=0.9"],
                                 capture_output=True, text=True, timeout=120, cwd=tmp_path)
        result = subprocess.run([sys.executable, "-m", "xbench", "load", s.url, "-b", "8", "-c", "2", "-d", "2",
                                 "--warmup", "0.5", "--slo", "goodput=0.9", "--goodput", "latency_ms<=60000",
                                 "-o", str(tmp_path / "slo")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        s.stop()
    assert without.returncode == 2 and "--goodput" in without.stderr
    assert result.returncode == 0, result.stderr
    docs = [json.loads(p.read_text()) for p in (tmp_path / "slo").glob("*.json")]
    probes = [d for d in docs if d["params"]["rate"]]
    assert probes and all(d["slo"]["metric"] == "goodput" and d["slo"]["bound"] == 0.9 for d in probes)
    assert all(d["slo"]["met"] == (d["goodput"]["fraction"] >= 0.9) for d in probes)
    assert "highest rate meeting goodput=0.9" in result.stdout
