import pytest

from xbench.bench.stats import Record, is_stable, latency_summary, summarize, window_rates


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
    rates = window_rates([0.5, 1.5, 1.6, 2.5], [10, 10, 10, 10], 0.0, 3.0, 3)
    assert rates == [10.0, 20.0, 10.0]


def test_stability_rule_flags_a_drifting_run():
    assert is_stable([5, 100, 100, 104, 97])
    assert not is_stable([100, 100, 100, 60, 100])
    assert not is_stable([100, 100])  # too few windows to judge


def test_summarize_counts_only_the_measurement_interval_and_errors():
    recs = [Record(0.0, 0.5, 8), Record(0.5, 1.5, 8), Record(1.0, 2.0, 8, ok=False, error="boom"), Record(2.0, 9.0, 8)]
    out = summarize(recs, 1.0, 3.0, windows=2)
    assert out["summary"]["requests"] == 1
    assert out["summary"]["errors"] == 1
    assert out["summary"]["pairs_per_s"] == pytest.approx(4.0)
    assert out["error_samples"] == {"boom": 1}
