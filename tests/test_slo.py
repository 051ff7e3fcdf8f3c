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
