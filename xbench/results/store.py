"""The one result writer: JSON documents with environment metadata, written atomically."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import xbench
from xbench.errors import DataError, XbenchError
from xbench.env import machine

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
RESULTS_DIR = Path("results")


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    try:
        repo = Path(__file__).resolve().parents[2]
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return proc.stdout.strip() if proc.returncode == 0 else None
    except Exception:
        return None


def environment() -> dict[str, Any]:
    """The `env` block of a result document: the machine, versions, commit and time."""
    return {**machine(), "xbench": xbench.__version__, "git_commit": _git_commit(),
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: str | Path, doc: Any) -> Path:
    """Write JSON atomically: a temp file in the same folder, then a rename."""
    return write_text(path, json.dumps(doc, indent=2, default=_jsonable) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """Write a file atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(folder: str | Path) -> None:
    """Fail before anything is measured when results could not be written into `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise XbenchError(f"cannot write results to {folder}: {exc.strerror or exc}") from None


def write_or_keep(path: Path, doc: Any) -> Path:
    """Write a measured document; if its place has become unwritable, keep it in a temporary
    folder instead (a measurement is never lost to a write error) and say where."""
    try:
        return write_json(path, doc)
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="xbench-results-")) / path.name
        write_json(fallback, doc)
        log.warning("could not write %s (%s); the result is kept in %s", path, exc.strerror or exc, fallback)
        return fallback


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_results(path: str | Path) -> list[dict]:
    """Every result document in a file or below a folder (by file name order). A study folder
    of `xbench sweep --all` lists its run folders in runs.json; those are read too. A `--records`
    file (JSONL) is rebuilt into its points' documents from its requests."""
    p = Path(path)
    if p.suffix in (".jsonl", ".parquet") and p.is_file():
        return rebuilt_from_records(p)
    files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
    if p.is_dir() and (p / "runs.json").is_file():
        files += sorted(f for run in json.loads((p / "runs.json").read_text()) for f in Path(run).rglob("*.json"))
    docs = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("schema_version") == SCHEMA_VERSION and "command" in doc:
            doc["_path"] = str(f)
            docs.append(doc)
    return docs


def rebuilt_from_records(path: Path) -> list[dict]:
    """`xbench load --records` lines (JSON lines or Parquet), measured again: the statistics of each
    point, recomputed."""
    from xbench.bench.stats import rebuild

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            lines = [{**row, "point": json.loads(row["point"])} for row in pq.read_table(path).to_pylist()]
        else:
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ImportError:
        raise DataError(f"{path}: reading Parquet records needs pyarrow: pip install pyarrow") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a --records file ({exc})") from None
    if not lines or not all(isinstance(x, dict) and {"start_s", "end_s"} <= set(x) for x in lines):
        raise DataError(f"{path}: not a --records file (each line needs start_s and end_s)")
    docs = []
    for block in rebuild(lines):
        point = block.pop("point")
        docs.append({"schema_version": SCHEMA_VERSION, "command": "load", "experiment": "records",
                     "params": {"batch": point.get("batch"), "concurrency": point.get("concurrency"),
                                "rate": point.get("rate"), "workload": f"records {path.name}"},
                     "rebuilt_from": str(path), **block, "_path": str(path)})
    return docs


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "run"


def run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def point_filename(params: dict[str, Any]) -> str:
    """A readable, unique-per-point file name, e.g. `pytorch-fp32-b128-c16-tw1-mw1-par.json`."""
    parts = [
        params.get("backend"), params.get("precision"),
        f"b{params.get('batch')}",
        f"r{params['rate']:g}" if params.get("rate") else f"c{params.get('concurrency')}",
        f"tw{params.get('tokenizer_workers')}" if params.get("tokenizer_workers") is not None else None,
        f"mw{params.get('model_workers')}" if params.get("model_workers") is not None else None,
        {True: "par", False: "nopar"}.get(params.get("parallelism")),  # type: ignore[arg-type]
    ]
    return slug("-".join(str(p) for p in parts if p)) + ".json"
