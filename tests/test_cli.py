"""The CLI as users and scripts run it: real subprocesses for the benches, exit codes for errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xbench.cli import app

SCHEMA_KEYS = {"schema_version", "command", "experiment", "config", "env", "model", "params",
               "summary", "latency_ms", "stages_ms", "stability"}


def xbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "xbench", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command,stages", [
    ("tokenize-bench", {"tokenize"}),
    ("infer-bench", {"queue", "infer"}),
    ("pipeline-bench", {"queue", "tokenize", "infer"}),
])
def test_bench_command_writes_a_result_document(tmp_path, tiny_overrides, command, stages):
    out = tmp_path / "point.json"
    proc = xbench(command, "-b", "8", "-c", "2", "-d", "1.5", "--warmup", "0.3", "-o", str(out),
                  *tiny_overrides, "tokenizer_pool.workers=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert SCHEMA_KEYS <= set(doc)
    assert doc["command"] == command
    assert doc["params"]["batch"] == 8 and doc["params"]["concurrency"] == 2
    assert doc["summary"]["requests"] > 0 and doc["summary"]["errors"] == 0
    assert doc["summary"]["pairs"] == 8 * doc["summary"]["requests"]
    assert set(doc["stages_ms"]) == stages
    lat = doc["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert doc["env"]["cores"] >= 1 and doc["env"]["torch"]
    assert doc["config"]["tokenizer_pool"]["workers"] == 2
    assert doc["model"]["relevance_trained"] is False
    assert "Pairs/s" in proc.stdout and "P99" in proc.stdout


def test_two_model_workers_load_in_a_fresh_process(tmp_path, tiny_overrides):
    # Both workers used to import transformers at once on their own threads, and its lazy
    # modules raised ImportError on one of them: every `model_pool.workers=2` run failed.
    out = tmp_path / "w2.json"
    proc = xbench("infer-bench", "-b", "8", "-c", "2", "-n", "6", "--warmup", "0", "-o", str(out),
                  *tiny_overrides, "model_pool.workers=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["params"]["model_workers"] == 2 and doc["summary"]["requests"] == 6


def test_a_grid_writes_one_file_per_point(tmp_path, tiny_overrides):
    proc = xbench("pipeline-bench", "-o", str(tmp_path / "out"), "experiment.batch_sizes=[4,8]",
                  "experiment.concurrency_levels=[1]", "experiment.duration_s=0.5", "experiment.warmup_s=0",
                  *tiny_overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = sorted((tmp_path / "out").glob("*.json"))
    assert [json.loads(f.read_text())["params"]["batch"] for f in files] == [4, 8]


@pytest.mark.slow
def test_requests_mode_and_open_loop(tmp_path, tiny_overrides):
    out = tmp_path / "n.json"
    assert xbench("pipeline-bench", "-b", "4", "-c", "2", "-n", "10", "--warmup", "0", "-o", str(out),
                  *tiny_overrides, cwd=tmp_path).returncode == 0
    assert json.loads(out.read_text())["summary"]["requests"] == 10
    out = tmp_path / "open.json"
    proc = xbench("pipeline-bench", "-b", "4", "--rate", "20", "-d", "1.5", "--warmup", "0.2", "-o", str(out),
                  "experiment.max_duration_s=1.5", *tiny_overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["load"]["mode"] == "open" and doc["load"]["target_rate"] == 20
    assert 8 < doc["load"]["achieved_send_rate"] < 35


@pytest.mark.parametrize("args,fragment", [
    (["model_pool.instances.0.backend=nope"], "backend='nope'"),
    (["model_pool.instances.0.device=mps"], "device='mps' is not present"),
    (["--batch", "0"], "experiment.batch_sizes=0"),
    (["model_pool.workers=0"], "model_pool.workers=0"),
    (["--data", "/nonexistent.jsonl"], "no such file"),
    (["batching.nonsense=1"], "nonsense"),
])
def test_bad_input_is_one_line_exit_2_and_no_result_file(tmp_path, tiny_overrides, args, fragment):
    out = tmp_path / "never.json"
    result = CliRunner().invoke(app, ["pipeline-bench", "-o", str(out), *tiny_overrides, *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("args,absent,message", [
    (["load", "http://127.0.0.1:9", "--generators", "2"], "hdrh", "--generators 2 needs hdrh: pip install 'xbench[ray]'"),
    (["load", "http://127.0.0.1:9", "--generators", "2", "--ray", "auto"], "ray", "ray: pip install 'xbench[ray]'"),
    (["serve", "--ray", "local"], "ray", "--ray needs ray: pip install 'xbench[ray]'"),
    (["sweep", "demo", "--launcher", "joblib"], "hydra_plugins.hydra_joblib_launcher",
     "--launcher joblib needs hydra_plugins.hydra_joblib_launcher: pip install hydra-joblib-launcher"),
    (["sweep", "demo", "--launcher", "ray"], "ray", "--launcher ray needs ray: "),
    (["infer-bench", "-d", "1", "model_pool.instances.0.backend=onnx"], "onnxruntime",
     "backend 'onnx' needs onnxruntime: pip install 'xbench[onnx]'"),
    (["infer-bench", "-d", "1", "model_pool.instances.0.backend=openvino"], "openvino",
     "backend 'openvino' needs openvino: pip install 'xbench[openvino]'"),
])
def test_a_missing_optional_package_is_one_line_naming_the_option_and_its_install(
        tmp_path, monkeypatch, tiny_overrides, args, absent, message):
    monkeypatch.setitem(sys.modules, absent, None)  # as if not installed: find_spec finds nothing, import fails
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, *tiny_overrides], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "results").exists()  # failed before anything was measured or written


def test_malformed_jsonl_line_is_exit_2(tmp_path, tiny_overrides):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "q", "document": "d"}\n{"query": 3}\n')
    result = CliRunner().invoke(app, ["tokenize-bench", "--data", str(data), *tiny_overrides])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output


def test_every_bench_option_has_help():
    for command in ("tokenize-bench", "infer-bench", "pipeline-bench"):
        text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        for option in ("--data", "--out", "--batch", "--concurrency", "--rate", "--duration", "--warmup", "--requests"):
            assert option in text


def test_score_writes_one_line_per_input_line_in_order(tmp_path, tiny_overrides):
    data = tmp_path / "in.jsonl"
    data.write_text('{"query": "q", "document": "paris"}\n'
                    '{"query": "q2", "documents": ["a much longer document about bananas", {"text": "x"}]}\n'
                    '{"query": "q", "document": "paris"}\n')
    out = tmp_path / "scores.jsonl"
    proc = xbench("score", "--data", str(data), "-o", str(out), *tiny_overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and len(lines[1]["scores"]) == 2
    assert lines[0]["score"] == lines[2]["score"] and 0 < lines[0]["score"] < 1


def test_score_on_mlx_exits_cleanly_and_says_it_is_the_slow_path(tmp_path, tiny_overrides):
    pytest.importorskip("mlx.core")
    data = tmp_path / "in.jsonl"
    data.write_text('{"query": "q", "documents": ["a", "b c", "d e f"]}\n')
    out = tmp_path / "scores.jsonl"
    proc = xbench("score", "--data", str(data), "-o", str(out), *tiny_overrides,
                  "model_pool.instances.0.backend=mlx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # no abort from an MLX thread at exit
    assert "slow reference" in proc.stderr and proc.stderr.count("slow reference") == 1
    assert len(json.loads(out.read_text())["scores"]) == 3


def test_config_prints_the_composed_config_with_overrides(tiny_overrides):
    result = CliRunner().invoke(app, ["config", "batching.max_batch_size=7", "workload.lengths=longtail"])
    assert result.exit_code == 0, result.output
    assert "max_batch_size: 7" in result.output and "lengths: longtail" in result.output
    bad = CliRunner().invoke(app, ["config", "batching.planner=greedy"])
    assert bad.exit_code == 2 and "expected one of [cost, tokens]" in bad.output


@pytest.mark.parametrize("make_unwritable", ["a-file", "under-proc"])
def test_an_unwritable_output_fails_before_measuring(tmp_path, tiny_overrides, make_unwritable):
    if make_unwritable == "a-file":
        (tmp_path / "results").write_text("not a folder")
        out = tmp_path / "results" / "point.json"
    else:
        out = Path("/proc/xbench-cannot-write/point.json")
    result = CliRunner().invoke(app, ["pipeline-bench", "-d", "30", "-o", str(out), *tiny_overrides])
    assert result.exit_code == 2, result.output
    assert "cannot write results to" in result.output and "Traceback" not in result.output


def test_a_write_failure_after_measuring_keeps_the_document(tmp_path, monkeypatch):
    from xbench.results import store

    def refuse(path, text):
        raise OSError(30, "Read-only file system")

    real = store.write_text
    monkeypatch.setattr(store, "write_text", lambda p, t: refuse(p, t) if "kept" not in str(p) else real(p, t))
    monkeypatch.setattr(store.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "kept"))
    kept = store.write_or_keep(tmp_path / "gone" / "point.json", {"summary": {"pairs": 3}})
    assert kept == tmp_path / "kept" / "point.json" and json.loads(kept.read_text())["summary"]["pairs"] == 3
