"""Real Prometheus against a real `xbench serve`: the shipped config is valid, the series exist,
and every PromQL expression of the Grafana dashboard evaluates."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serving import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
OBS = ROOT / "observability"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason="prometheus/promtool not installed (apt-get install prometheus)")


def dashboard_exprs() -> list[str]:
    dash = json.loads((OBS / "grafana" / "dashboards" / "xbench.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


@needs_prometheus
def test_shipped_prometheus_config_passes_promtool():
    proc = subprocess.run([PROMTOOL, "check", "config", str(OBS / "prometheus.yml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_covers_the_operational_questions():
    exprs = " ".join(dashboard_exprs())
    for metric in ("xbench_requests_total", "xbench_pairs_total", "xbench_request_duration_seconds_bucket",
                   "xbench_queue_size_pairs", "xbench_batch_size_pairs", "status!~",
                   "xbench_queue_wait_estimate_seconds", "status=~\"429|503\""):
        assert metric in exprs
    assert all(f"histogram_quantile({q}" in exprs for q in ("0.5", "0.95", "0.99"))


@pytest.mark.slow
@needs_prometheus
def test_prometheus_scrapes_the_server_and_every_dashboard_query_evaluates(tiny_model, tmp_path):
    server = start_server([f"model_pool.instances.0.name={tiny_model}"])
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    target = server.url.removeprefix("http://")
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: xbench\n    static_configs:\n      - targets: ['{target}']\n")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        deadline = time.time() + 60
        found = False
        while time.time() < deadline and not found:
            for body in ({"query": "q", "texts": ["a b", "c d e"]}, {"query": "q"}):
                httpx.post(server.url + "/rerank", json=body, timeout=30)
            try:
                r = httpx.get(api, params={"query": "sum(xbench_pairs_total) > 0"}, timeout=5).json()
                found = r["status"] == "success" and bool(r["data"]["result"])
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert found, "Prometheus never saw xbench_pairs_total"
        time.sleep(2)  # two more scrapes (1 s apart), so rate() over [1m] has two points
        for series in ("xbench_requests_total", "xbench_request_duration_seconds_bucket", "xbench_model_info",
                       "xbench_batch_size_pairs_bucket", "xbench_stage_duration_seconds_bucket"):
            r = httpx.get(api, params={"query": series}, timeout=5).json()
            assert r["data"]["result"], f"no series {series}"
        for expr in dashboard_exprs():
            r = httpx.get(api, params={"query": expr}, timeout=5).json()
            assert r["status"] == "success", (expr, r)
        errors = httpx.get(api, params={"query": 'sum(xbench_requests_total{status="422"})'}, timeout=5).json()
        assert float(errors["data"]["result"][0]["value"][1]) >= 1
    finally:
        prom.terminate()
        prom.wait(10)
        server.stop()
