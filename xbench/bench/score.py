"""`xbench score`: batch-rerank a JSONL file through the pipeline, output in input order."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.progress import Progress

from xbench.core.pipeline import Pipeline, sigmoid
from xbench.core.request import RerankJob
from xbench.workload import parse_line
from xbench.errors import DataError

IN_FLIGHT = 64  # lines submitted ahead, so batches stay full without holding the whole file


def read_lines(path: Path) -> list[tuple[str, list[str], bool]]:
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    with path.open(encoding="utf-8") as fh:
        return [parse_line(line, f"{path}:{n}") for n, line in enumerate(fh, 1) if line.strip()]


def score_file(cfg: DictConfig, data: Path, out: Path, raw_scores: bool = False,
               console: Console | None = None) -> tuple[int, int, float]:
    """Write one JSON line per input line; returns (lines, pairs, seconds)."""
    lines = read_lines(Path(data))  # validate the whole file before loading a model
    total_pairs = sum(len(docs) for _, docs, _ in lines)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    start = time.perf_counter()
    try:
        with Pipeline.from_config(cfg) as pipe, os.fdopen(fd, "w") as fh, Progress(console=console) as progress:
            task = progress.add_task("scoring pairs", total=total_pairs)
            pending: list[tuple[RerankJob, bool]] = []

            def flush(keep: int) -> None:
                while len(pending) > keep:
                    job, is_pair = pending.pop(0)
                    logits = job.result().logits
                    scores = (logits if raw_scores else sigmoid(logits)).tolist()
                    fh.write(json.dumps({"score": scores[0]} if is_pair else {"scores": scores}) + "\n")
                    progress.advance(task, len(scores))

            for query, docs, is_pair in lines:
                pending.append((pipe.submit([(query, d) for d in docs]), is_pair))
                flush(IN_FLIGHT)
            flush(0)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return len(lines), total_pairs, time.perf_counter() - start
