"""Result tables: a row's label tells its point apart, rows follow the experiment's axes, and a
table over several experiments names each row's experiment."""

from __future__ import annotations

import json
import random
from pathlib import Path

from xbench.results.compare import compare
from xbench.results.report import configuration, export_text, in_order, markdown_table
from xbench.results.store import SCHEMA_VERSION

GRID = {"workload.lengths": ["msmarco", "longtail"], "model_pool.instances.0.packed": [True, False]}


def point(experiment: str, batch: int, lengths: str = "msmarco", packed: bool = True, grid: dict | None = None) -> dict:
    """A result document as a sweep writes it, with just what the tables read."""
    workload = "synthetic(seed=0, pairs=4096" + (f", lengths={lengths})" if lengths != "msmarco" else ")")
    return {
        "command": "pipeline-bench",
        "_path": f"results/{experiment}/20261129-000000/pipeline-bench-b{batch}-{random.random():.6f}.json",
        "config": {"experiment": {"grid": grid if grid is not None else {}},
                   "workload": {"lengths": lengths}, "model_pool": {"instances": [{"packed": packed}]}},
        "params": {"backend": "pytorch", "precision": "fp32", "batch": batch, "concurrency": 4,
                   "tokenizer_workers": 1, "model_workers": 1, "parallelism": True, "workload": workload},
        "summary": {"requests": 10, "requests_per_s": 1.0, "pairs_per_s": float(batch), "errors": 0},
        "latency_ms": {"mean": 1.0, "p50": 1.0, "p95": 1.0, "p99": 1.0},
        "stability": {"stable": True},
    }


def test_a_label_names_the_grid_axes_no_column_shows():
    docs = [point("11_length_mix", 32, lengths, packed, GRID) for lengths in ("msmarco", "longtail") for packed in (True, False)]
    labels = [configuration(d) for d in docs]
    assert len(set(labels)) == 4  # without the packed axis two pairs of rows would read the same
    assert labels[3] == "Full pipeline · pytorch fp32 · b32 c4 · longtail · packed=false"
    assert all("lengths=" not in label for label in labels)  # the workload is shown once, as its mix
    # a chart's line over batch sizes: the same name without the batch, and with the worker counts
    assert configuration(docs[2], drop="batch", workers=True) == "Full pipeline · pytorch fp32 · c4 · longtail · packed=true · tw1+par · mw1"


def test_rows_follow_the_experiments_axes_not_file_names():
    docs = [point("11_length_mix", 32, lengths, packed, GRID) for lengths in ("msmarco", "longtail") for packed in (True, False)]
    docs += [point("08_batch_sizes", b) for b in (16, 64, 256)]
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    ordered = in_order(sorted(shuffled, key=lambda d: d["_path"]))
    assert [d["params"]["batch"] for d in ordered[:3]] == [16, 64, 256]  # by number: b256 after b64
    assert [(d["config"]["workload"]["lengths"], d["config"]["model_pool"]["instances"][0]["packed"])
            for d in ordered[3:]] == [("msmarco", True), ("msmarco", False), ("longtail", True), ("longtail", False)]


def test_a_table_over_several_experiments_names_each_rows_experiment():
    one = [point("08_batch_sizes", b) for b in (16, 64)]
    both = one + [point("09_concurrency", 32)]
    assert "Experiment" not in markdown_table(one).splitlines()[0]
    lines = markdown_table(both).splitlines()
    assert lines[0].startswith("| Experiment | Configuration |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 08_batch_sizes"] * 2 + ["| 09_concurrency"]
    csv = export_text([both[1], both[0], both[2]], "csv").splitlines()  # runs as given, points in order
    assert [row.split(",")[0] for row in csv[1:]] == [configuration(d) for d in both]


def test_a_grid_over_commands_keeps_its_order_and_names_each_once():
    commands = ["tokenize-bench", "infer-bench", "pipeline-bench"]
    docs = []
    for command in commands:  # the demo's grid: one point of each stage
        doc = point("demo", 16, grid={"experiment.command": commands})
        doc["command"] = doc["config"]["experiment"]["command"] = command
        docs.append(doc)
    ordered = in_order(sorted(docs, key=lambda d: d["command"]))
    assert [d["command"] for d in ordered] == commands
    assert [configuration(d) for d in ordered] == ["Tokenizer only · b16 c4", "Inference only · pytorch fp32 · b16 c4",
                                                   "Full pipeline · pytorch fp32 · b16 c4"]


def test_compare_matches_a_length_mix_point_for_point(tmp_path: Path):
    """Four points whose backend, batch, load and workers are equal: each must meet its own
    counterpart, not whichever was read last."""
    for run, scale in (("a", 1.0), ("b", 2.0)):
        folder = tmp_path / run / "11_length_mix" / "20261129-000000"
        folder.mkdir(parents=True)
        for i, (lengths, packed) in enumerate((m, p) for m in ("msmarco", "longtail") for p in (True, False)):
            doc = point("11_length_mix", 32, lengths, packed, GRID)
            doc["summary"]["pairs_per_s"] = scale * (10 + i)  # B is twice A, point for point
            doc["schema_version"] = SCHEMA_VERSION
            (folder / f"point-{i}.json").write_text(json.dumps(doc))
    rows = compare(tmp_path / "a", tmp_path / "b", threshold=0.15)
    assert len(rows) == 4 and len({r["point"] for r in rows}) == 4
    assert all(r["pairs_ratio"] == 2.0 for r in rows)
