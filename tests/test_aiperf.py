"""A real third-party client: NVIDIA AIPerf's cohere-rankings endpoint drives `xbench serve`.

AIPerf lives in its own virtualenv (`make aiperf`, which `.ci/run` runs); every request it sends
must be answered 200 with one score per document, sorted by score."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from xbench.checkpoints import resolve_model
from serving import start_server

AIPERF = Path(os.environ.get("XBENCH_AIPERF", Path(__file__).parents[1] / ".venv-aiperf" / "bin" / "aiperf"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not AIPERF.is_file(), reason=f"AIPerf is not installed at {AIPERF}: "
                                 "`make aiperf` builds its virtualenv (.ci/run does)")]


def test_aiperf_rankings_are_answered_in_order(tmp_path, tiny_model):
    server = start_server([f"model_pool.instances.0.name={tiny_model}"])
    try:
        result = subprocess.run(
            [str(AIPERF), "profile", "--model", str(tiny_model), "--url", server.url,  # the served name
             "--tokenizer", str(resolve_model("default").path), "--endpoint-type", "cohere-rankings",
             "--concurrency", "4", "--request-count", "24", "--rankings-passages-mean", "16",
             "--rankings-passages-stddev", "6", "--rankings-passages-prompt-token-mean", "60",
             "--rankings-query-prompt-token-mean", "8", "--random-seed", "3", "--ui-type", "none",
             "--export-level", "raw", "--artifact-dir", str(tmp_path / "aiperf")],
            # AIPerf reads a local tokenizer folder only with the hub switched on (HF_HUB_OFFLINE=1
            # makes it take the path for a repo id); the folder is local, so nothing is fetched.
            capture_output=True, text=True, timeout=300,
            env={k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"})
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    raw = [json.loads(line) for line in (tmp_path / "aiperf" / "profile_export_raw.jsonl").read_text().splitlines()]
    assert len(raw) == 24
    sizes = set()
    for record in raw:
        assert record["status"] == 200
        answer = json.loads(record["responses"][-1]["text"])
        documents = record["payload"]["documents"]
        scores = [r["relevance_score"] for r in answer["results"]]
        assert sorted(r["index"] for r in answer["results"]) == list(range(len(documents)))
        assert scores == sorted(scores, reverse=True)
        sizes.add(len(documents))
    assert len(sizes) > 1  # its passage counts vary, and every size was served
