import numpy as np
import pytest

from xbench.bench.stats import Record, even_edges, is_stable, latency_summary, rate_interval, summarize, window_rates


def test_percentiles_match_known_list():
    values_s = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    s = latency_summary(values_s)
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["max"] == pytest.approx(100.0)


def test_empty_latencies_are_none_not_zero():
    assert latency_summary([])["p99"] is None


def test_window_rates_split_by_completion_time():
    rates = window_rates([0.5, 1.5, 1.6, 2.5], [10, 10, 10, 10], even_edges(0.0, 3.0, 3))
    assert rates == [10.0, 20.0, 10.0]
    # uneven windows, a completion on the last edge, and one outside
    assert window_rates([0.5, 1.5, 3.0, 3.5], [10, 10, 10, 10], [0.0, 1.0, 3.0]) == [10.0, 10.0]


def test_stability_rule_flags_a_drifting_run():
    assert is_stable([5, 100, 100, 104, 97])
    assert not is_stable([100, 100, 100, 60, 100])
    assert not is_stable([100, 100])  # too few windows to judge


def test_summarize_counts_only_the_measurement_interval_and_errors():
    recs = [Record(0.0, 0.5, 8), Record(0.5, 1.5, 8), Record(1.0, 2.0, 8, ok=False, error="boom"), Record(2.0, 9.0, 8)]
    out = summarize(recs, even_edges(1.0, 3.0, 2))
    assert out["summary"]["requests"] == 1
    assert out["summary"]["errors"] == 1
    assert out["summary"]["pairs_per_s"] == pytest.approx(4.0)
    assert out["error_samples"] == {"boom": 1}


def test_confidence_intervals_cover_what_they_estimate():
    from xbench.bench.stats import percentile_interval

    # equal windows: the plain Student t interval of the mean
    lo, hi = rate_interval([10.0, 11.0, 9.0, 10.5, 9.5], [1.0] * 5)
    assert lo < 10.0 < hi and hi - lo == pytest.approx(2 * 2.776 * 0.7906 / 5 ** 0.5, rel=1e-3)
    assert rate_interval([10.0], [1.0]) is None
    # unequal windows: centred on total / time, not on the mean of the rates
    lo, hi = rate_interval([10.0, 20.0, 12.0], [1.0, 1.0, 8.0])
    assert (lo + hi) / 2 == pytest.approx((10 + 20 + 96) / 10)
    rng = np.random.default_rng(1)
    sample = rng.exponential(0.1, 5000)  # seconds; true p99 = 0.1 * ln(100) s
    lo, hi = percentile_interval(sample, 99)
    assert lo < 100 * np.log(100) < hi and hi - lo < 0.2 * 100 * np.log(100)
    few = percentile_interval(sample[:200], 99)
    assert few[0] < lo and few[1] is None  # 200 requests cannot bound a p99 from above
    lo50, hi50 = percentile_interval(sample[:200], 50)
    assert lo50 < 100 * np.log(2) < hi50
    # coverage: over many samples of 100, the p50 interval holds the true median >= 95% of the time
    hits = 0
    for k in range(400):
        lo_k, hi_k = percentile_interval(rng.exponential(0.1, 100), 50)
        hits += lo_k <= 100 * np.log(2) <= hi_k
    assert hits >= 0.93 * 400


def test_summary_reports_its_intervals():
    recs = [Record(start=i * 0.01, end=i * 0.01 + 0.05 + (i % 7) * 0.001, pairs=4) for i in range(500)]
    out = summarize(recs, even_edges(0.0, 5.05, 5))
    ci = out["confidence"]
    assert ci["level"] == 0.95 and ci["pairs_per_s"][0] <= out["summary"]["pairs_per_s"] <= ci["pairs_per_s"][1] * 1.01
    assert ci["latency_ms"]["p50"][0] <= out["latency_ms"]["p50"] <= ci["latency_ms"]["p50"][1]
    assert "order statistics" in ci["latency_method"]


def test_even_edges_end_exactly_where_the_interval_does():
    # 0.007623 + (0.013941 - 0.007623) is 0.013941000000000002 in floating point
    edges = even_edges(0.007623, 0.013941, 5)
    assert edges[0] == 0.007623 and edges[-1] == 0.013941 and len(edges) == 6
    assert all(a < b for a, b in zip(edges, edges[1:]))
