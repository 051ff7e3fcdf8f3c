"""The one result writer: JSON documents with environment metadata, written atomically."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import xbench
from xbench.bench.ceilings import cpu_features

SCHEMA_VERSION = 1
RESULTS_DIR = Path("results")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _static_env() -> dict[str, Any]:
    env: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_features": cpu_features(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "xbench": xbench.__version__,
        "gpu": None,
    }
    for mod in ("torch", "transformers", "tokenizers", "onnxruntime", "mlx", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            env["gpu"] = "Apple MPS"
    except Exception:
        pass
    try:
        repo = Path(__file__).resolve().parents[2]
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        env["git_commit"] = proc.stdout.strip() if proc.returncode == 0 else None
    except Exception:
        env["git_commit"] = None
    return env


def environment() -> dict[str, Any]:
    return {**_static_env(), "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: str | Path, doc: Any) -> Path:
    """Write JSON atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2, default=_jsonable)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_results(path: str | Path) -> list[dict]:
    """Every result document in a file or below a folder (by file name order). A study folder
    of `xbench sweep --all` lists its run folders in runs.json; those are read too."""
    p = Path(path)
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
