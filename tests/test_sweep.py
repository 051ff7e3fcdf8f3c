"""Sweeps over a tiny model: files per point, results.md, resume, failures, plots, compare, joblib."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xbench.results.compare import compare

# The experiment allows 90 s. Windows close on 5 requests, so a machine several times slower
# than ours still closes the 3 windows a confidence interval needs before the 3 s limit.
FAST = ["experiment.duration_s=0.6", "experiment.warmup_s=0.1", "experiment.max_duration_s=3",
        "experiment.min_requests_per_window=5"]


def xbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "xbench", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def run_dir(cwd: Path, name: str) -> Path:
    runs = sorted((cwd / "results" / name).iterdir())
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def two_point_sweep(tmp_path_factory, tiny_model):
    """One sweep run for the module: the tests below read it, re-run it, plot and compare it."""
    cwd = tmp_path_factory.mktemp("sweep")
    args = ["sweep", "09_concurrency", f"model_pool.instances.0.name={tiny_model}", *FAST,
            "experiment.batch_sizes=[4,8]", "experiment.concurrency_levels=[2]"]
    first = xbench(*args, cwd=cwd)
    assert first.returncode == 0, first.stderr
    return cwd, args, first


def test_sweep_writes_a_json_per_point_and_a_report(two_point_sweep):
    cwd, _, proc = two_point_sweep
    folder = run_dir(cwd, "09_concurrency")
    docs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert sorted(d["params"]["batch"] for d in docs) == [4, 8]
    assert all(d["summary"]["requests"] > 0 for d in docs)
    report = (folder / "results.md").read_text()
    for col in ("Configuration", "Tokenizer workers", "Model workers", "Parallelism", "RPS", "Pairs/s", "Mean", "P50", "P95", "P99"):
        assert col in report
    assert "**Machine:**" in report and report.count("| Full pipeline") == 2
    assert "Pairs/s" in proc.stdout


@pytest.mark.slow
def test_rerunning_a_sweep_resumes_and_force_remeasures(two_point_sweep):
    cwd, args, _ = two_point_sweep
    folder = run_dir(cwd, "09_concurrency")
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    again = xbench(*args, cwd=cwd)
    assert again.returncode == 0 and again.stderr.count("already measured") == 2
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} == before
    forced = xbench(*args, "--force", cwd=cwd)
    assert forced.returncode == 0 and "already measured" not in forced.stderr
    assert all(p.stat().st_mtime_ns != before[p.name] for p in folder.glob("*.json"))


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_overrides):
    proc = xbench("sweep", "09_concurrency", *tiny_overrides, *FAST, "experiment.concurrency_levels=[1]",
                  "experiment.batch_sizes=[4]", "model_pool.instances.0.backend=onnx",
                  "model_pool.instances.0.quantization=fp32,bf16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(p.read_text()) for p in run_dir(tmp_path, "09_concurrency").glob("*.json")]
    failed = [d for d in docs if d.get("error")]
    assert len(docs) == 2 and len(failed) == 1 and "bf16" in failed[0]["error"]
    assert "failed" in (run_dir(tmp_path, "09_concurrency") / "results.md").read_text()


def test_unknown_experiment_and_bad_key_exit_2(tmp_path):
    assert xbench("sweep", "no_such_experiment", cwd=tmp_path).returncode == 2
    bad = xbench("sweep", "demo", "experiment.nope=1", cwd=tmp_path)
    assert bad.returncode == 2 and "nope" in bad.stderr


@pytest.mark.slow
def test_joblib_launcher_runs_the_points(tmp_path, tiny_overrides):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[dev]' (.ci/run installs it)")
    proc = xbench("sweep", "09_concurrency", *tiny_overrides, *FAST, "experiment.batch_sizes=[4,8]",
                  "experiment.concurrency_levels=[1]", "--launcher", "joblib", "hydra.launcher.n_jobs=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list(run_dir(tmp_path, "09_concurrency").glob("*.json"))) == 2


def test_plot_writes_charts_and_an_index_that_shows_them(two_point_sweep):
    cwd, _, _ = two_point_sweep
    proc = xbench("plot", "results", "-o", "plots", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted((cwd / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"batch_size.png", "configurations.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    page = (cwd / "plots" / "index.html").read_text()
    assert all(p.name in page for p in pngs) and "data:image/png;base64," in page and "<table>" in page


def test_plot_draws_concurrency_with_error_bars(two_point_sweep, tmp_path):
    cwd, _, _ = two_point_sweep
    for p in run_dir(cwd, "09_concurrency").glob("*.json"):  # the same points at a second concurrency
        doc = json.loads(p.read_text())
        for c in (2, 4):
            doc["params"]["concurrency"] = c
            (tmp_path / f"c{c}-{p.name}").write_text(json.dumps(doc))
    proc = xbench("plot", str(tmp_path), "-o", str(tmp_path / "plots"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plots" / "concurrency.png").stat().st_size > 5000


def test_compare_computes_ratios_and_flags_past_the_threshold(two_point_sweep, tmp_path):
    cwd, _, _ = two_point_sweep
    measured = run_dir(cwd, "09_concurrency")
    m_doc = next(json.loads(p.read_text()) for p in measured.glob("*.json"))
    assert len(m_doc["confidence"]["pairs_per_s"]) == 2  # every point carries its 95% interval
    # The measured intervals are as wide as the machine is noisy (a slow CI machine closes few
    # windows); the verdicts below depend on the width, so both sides get a fixed ±3%.
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()

    def write(folder: Path, scale_b4: float, scale_b8: float, interval_b4=None):
        for p in measured.glob("*.json"):
            doc = json.loads(p.read_text())
            doc["summary"]["pairs_per_s"] *= scale_b4 if doc["params"]["batch"] == 4 else scale_b8
            speed = doc["summary"]["pairs_per_s"]
            doc["confidence"]["pairs_per_s"] = [0.97 * speed, 1.03 * speed]
            if interval_b4 and doc["params"]["batch"] == 4:
                doc["confidence"]["pairs_per_s"] = interval_b4
            (folder / p.name).write_text(json.dumps(doc))

    def write_b(scale_b4: float, interval_b4=None):
        write(b, scale_b4, 1.02, interval_b4)
        return {r["point"]: r for r in compare(a, b, threshold=0.15)}

    write(a, 1.0, 1.0)
    rows = write_b(0.5)
    slow = next(r for k, r in rows.items() if "b4 " in k)
    same = next(r for k, r in rows.items() if "b8 " in k)
    assert slow["pairs_ratio"] == pytest.approx(0.5) and slow["regression"]
    assert same["pairs_ratio"] == pytest.approx(1.02) and not same["regression"] and same["inconclusive"]
    proc = xbench("compare", str(a), str(b), "--fail-on-regression", cwd=cwd)
    assert proc.returncode == 1 and "regression" in proc.stdout
    # Past the threshold but with intervals that overlap: not a regression, and said to be inconclusive.
    rows = write_b(0.5, interval_b4=[0.0, 1e9])
    slow = next(r for k, r in rows.items() if "b4 " in k)
    assert not slow["regression"] and slow["inconclusive"]
    proc = xbench("compare", str(a), str(b), "--fail-on-regression", cwd=cwd)
    assert proc.returncode == 0 and "inconclusive" in proc.stdout


@pytest.mark.slow
def test_ctrl_c_keeps_finished_points_and_writes_the_report(tmp_path, tiny_overrides):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "xbench", "sweep", "09_concurrency", *tiny_overrides,
                             "experiment.duration_s=1", "experiment.max_duration_s=2", "experiment.warmup_s=0",
                             "experiment.batch_sizes=[4]", "experiment.concurrency_levels=[1,2,3,4,5,6]"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "results").rglob("*.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    folder = run_dir(tmp_path, "09_concurrency")
    finished = list(folder.glob("*.json"))
    assert 1 <= len(finished) < 6
    assert all(json.loads(p.read_text())["summary"]["requests"] > 0 for p in finished)
    assert (folder / "results.md").read_text().count("| Full pipeline") == len(finished)


def test_results_md_says_what_was_measured(two_point_sweep):
    cwd, _, _ = two_point_sweep
    report = (run_dir(cwd, "09_concurrency") / "results.md").read_text()
    assert "## What was measured" in report
    assert "**Workload** `synthetic(seed=0" in report and "tokens per pair: mean" in report
    assert "**Model** `" in report and "seeded head" in report


def test_report_exports_csv_json_and_markdown(two_point_sweep, tmp_path):
    import csv

    cwd, _, _ = two_point_sweep
    folder = run_dir(cwd, "09_concurrency")
    proc = xbench("report", str(folder), "--format", "csv", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert sorted(int(r["batch"]) for r in rows) == [4, 8]
    for r in rows:
        assert float(r["pairs_per_s_ci_low"]) <= float(r["pairs_per_s"]) <= float(r["pairs_per_s_ci_high"])
        assert float(r["p50_ms_ci_low"]) <= float(r["p50_ms"]) <= float(r["p50_ms_ci_high"])
        assert float(r["p99_ms_ci_low"]) <= float(r["p99_ms"])
        assert r["p99_ms_ci_high"] == "" or float(r["p99_ms"]) <= float(r["p99_ms_ci_high"])  # "": unknown
        assert r["stable"] in ("True", "False") and r["workload"].startswith("synthetic")
    out = tmp_path / "points.json"
    assert xbench("report", str(folder), "-f", "json", "-o", str(out), cwd=cwd).returncode == 0
    assert [r["pairs_per_s"] for r in json.loads(out.read_text())] == [float(r["pairs_per_s"]) for r in rows]
    md = xbench("report", str(folder), cwd=cwd).stdout
    assert md.count("| Full pipeline") == 2 and "## What was measured" in md
    bad = xbench("report", str(folder), "--format", "xlsx", cwd=cwd)
    assert bad.returncode == 2 and "--format 'xlsx'" in bad.stderr and "csv" in bad.stderr
    empty = xbench("report", str(tmp_path / "nothing"), cwd=cwd)
    assert empty.returncode == 2 and "no result documents" in empty.stderr


def test_an_unconverged_point_is_explained():
    from xbench.results.report import convergence_section

    doc = {"command": "infer-bench", "params": {"backend": "pytorch", "precision": "fp32", "batch": 128,
                                                "concurrency": 1},
           "stability": {"stable": False, "spread_pct": 23.0, "windows": 3, "window_s": [2.0, 2.0, 2.0],
                         "metric": "pairs_per_s", "time_limit_s": 30.0},
           "load": {"measured_s": 30.2}, "latency_ms": {"p50": 4000.0}}
    text = convergence_section([doc, {**doc, "stability": {"stable": True}}])
    assert text.count("\n- ") == 1
    assert "differed by 23%" in text and "one request takes 4.0 s" in text and "max_duration_s" in text
