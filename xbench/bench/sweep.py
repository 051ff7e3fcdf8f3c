"""`xbench sweep`: an experiment's grid as a Hydra multirun, one measured point per job.

The grid (experiment.batch_sizes x concurrency_levels x experiment.grid) becomes Hydra sweep
overrides, so any Hydra launcher runs it: the default runs points one after another (parallel
points on one machine would disturb each other's timings); `hydra/launcher=joblib` runs them in
worker processes; submitit (SLURM) or Ray spread them over identical machines.

Each job writes its point's result document into the run folder (on a Ray cluster the driver
writes what the nodes return: hydra_plugins/xbench_ray_launcher), named by a hash of its
composed config: re-running the sweep skips points already measured (`--force` re-measures),
a failing point is written with its error and the sweep goes on, and an interrupted sweep
leaves every finished point intact for the report.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from xbench.config import compose_config, conf_dir, experiment_names, to_dict, validate
from xbench.errors import XbenchError, require
from xbench.results.store import (RESULTS_DIR, SCHEMA_VERSION, check_writable, environment, point_filename,
                                  read_results, run_id, write_or_keep, write_text)


# Launchers whose plugin is a package of its own: what each needs, and the command that installs it.
LAUNCHER_PACKAGES = {
    "joblib": (("hydra_plugins.hydra_joblib_launcher",), "pip install hydra-joblib-launcher"),
    "ray": (("ray",), "pip install 'xbench[ray]'"),
    **{name: (("hydra_plugins.hydra_submitit_launcher",), "pip install 'xbench[ray]'")
       for name in ("submitit_local", "submitit_slurm")},
}


def config_key(cfg: DictConfig) -> str:
    """A short hash of everything that defines a point (the composed config but the sweep's own
    bookkeeping)."""
    text = json.dumps({k: v for k, v in to_dict(cfg).items() if k != "sweep"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def grid_overrides(cfg: DictConfig) -> list[str]:
    """The experiment's grid as Hydra sweep overrides, one value per point."""
    e = cfg.experiment
    out = [
        "experiment.batch_sizes=" + ",".join(f"[{b}]" for b in e.batch_sizes),
        "experiment.concurrency_levels=" + ",".join(f"[{c}]" for c in e.concurrency_levels),
    ]
    for key, values in (e.grid or {}).items():
        out.append(f"{key}=" + ",".join(_value(v) for v in values))
    return out


def _quoted(text: str) -> str:
    """A value for Hydra's override grammar, whatever characters a path holds."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def count_points(cfg: DictConfig) -> int:
    n = len(cfg.experiment.batch_sizes) * len(cfg.experiment.concurrency_levels)
    for values in (cfg.experiment.grid or {}).values():
        n *= len(values)
    return n


def _existing(run_dir: Path, key: str) -> Path | None:
    for path in run_dir.glob(f"*-{key}.json"):
        try:
            if not json.loads(path.read_text()).get("error"):
                return path
        except (OSError, json.JSONDecodeError):
            continue
    return None


@dataclass
class Point:
    """One job of the grid: its config (without `hydra`), what to call it, and where its result goes."""

    cfg: DictConfig
    label: str
    key: str
    out: Path
    params: dict[str, Any]

    def measured(self) -> Path | None:
        """The result file of an earlier run of this point, unless --force."""
        return None if self.cfg.sweep.force else _existing(self.out.parent, self.key)


def plan_point(job_cfg: DictConfig) -> Point:
    cfg: DictConfig = OmegaConf.masked_copy(job_cfg, [k for k in job_cfg.keys() if k != "hydra"])  # type: ignore
    e = cfg.experiment
    label = f"{e.command} batch {e.batch_sizes[0]} c{e.concurrency_levels[0]} " + " ".join(
        f"{k}={OmegaConf.select(cfg, k)}" for k in (e.grid or {}))
    params = {"batch": e.batch_sizes[0], "concurrency": e.concurrency_levels[0],
              "tokenizer_workers": cfg.tokenizer_pool.workers, "model_workers": cfg.model_pool.workers,
              "parallelism": cfg.tokenizer_pool.parallelism, "backend": cfg.model_pool.instances[0].backend,
              "precision": cfg.model_pool.instances[0].quantization}
    key = config_key(cfg)
    stem = point_filename(params).removesuffix(".json")
    return Point(cfg, label, key, Path(cfg.sweep.run_dir) / f"{e.command}-{stem}-{key}.json", params)


def measure_point(point: Point, console: Any) -> dict:
    """Measure one point and return its document; a failure is a document with its error. Writes
    nothing: the caller (a local job, or a remote launcher's driver) writes it."""
    from xbench.bench.runners import run_bench
    from xbench.workload import make_workload

    cfg, e = point.cfg, point.cfg.experiment
    try:
        validate(cfg)
        workload = make_workload(cfg.sweep.data, cfg)
        return run_bench(e.command, cfg, workload, console=console, write=False)[0]
    except (Exception, SystemExit) as exc:  # a failed point is a result; the sweep goes on
        return failed_document(point, f"{type(exc).__name__}: {exc}")


def failed_document(point: Point, message: str) -> dict:
    cfg = point.cfg
    return {"schema_version": SCHEMA_VERSION, "command": cfg.experiment.command, "experiment": cfg.name,
            "config": to_dict(cfg), "env": environment(), "model": {"name": cfg.model_pool.instances[0].name},
            "params": point.params, "error": message[:500]}


@hydra.main(version_base="1.3", config_path=None, config_name="config")
def sweep_job(job_cfg: DictConfig) -> None:
    """One point of the grid (a Hydra job) measured in this process. Its run folder and flags come
    in its own config (`sweep.*`); the Ray launcher (hydra_plugins/xbench_ray_launcher) instead
    plans here, measures on a cluster node and writes on the driver."""
    from hydra.core.hydra_config import HydraConfig
    from rich.console import Console

    if ctrl_c_pressed():
        raise KeyboardInterrupt
    console = Console(stderr=True)
    point = plan_point(job_cfg)
    number = HydraConfig.get().job.num + 1  # this point's place in the grid, whatever is on disk
    console.print(f"[bold]point {number}/{point.cfg.sweep.points or '?'}[/] {point.label}")
    if found := point.measured():
        console.print(f"  [dim]already measured: {found.name} (--force re-measures)[/]")
        return
    doc = measure_point(point, console)
    if doc.get("error"):
        console.print(f"  [red]failed:[/] {doc['error']}")
    write_point(point, doc)


def write_point(point: Point, doc: dict) -> Path:
    doc.pop("_path", None)
    return write_or_keep(point.out, doc)


def latest_run(name: str) -> Path | None:
    runs = sorted(p for p in (RESULTS_DIR / name).glob("*") if p.is_dir())
    return runs[-1] if runs else None


def split_sweeps(overrides: list[str]) -> tuple[list[str], int]:
    """Overrides with each command-line sweep (`key=a,b`) cut to its first value, for validating
    the config up front, and how many points the command-line sweeps multiply the grid by."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain, factor = [], 1
    parser = OverridesParser.create()
    for text in overrides:
        try:
            o = parser.parse_override(text)
        except Exception as exc:
            raise XbenchError(f"override {text!r}: {str(exc).splitlines()[0]}") from None
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            factor *= len(values)
            plain.append(f"{o.get_key_element()}={values[0]}")
        else:
            plain.append(text)
    return plain, factor


def run_sweep(name: str, overrides: list[str], force: bool = False, new_run: bool = False,
              data: str | None = None, launcher: str | None = None) -> Path:
    """Run every point of experiment `name`; returns the run folder (which holds results.md)."""
    if launcher:
        require(f"--launcher {launcher}", *LAUNCHER_PACKAGES.get(launcher, ((), "")))
    plain, factor = split_sweeps(overrides)
    # Fail fast, naming the bad key; hydra.* settings belong to the launcher, checked by Hydra itself.
    cfg = compose_config([o for o in plain if not o.startswith(("hydra.", "hydra/"))], experiment=name)
    run_dir = None if new_run else latest_run(name)
    run_dir = (run_dir or RESULTS_DIR / name / run_id()).resolve()
    check_writable(run_dir)  # before any point is measured
    bookkeeping = [f"sweep.run_dir={_quoted(str(run_dir))}", f"sweep.points={count_points(cfg) * factor}",
                   f"sweep.force={str(force).lower()}"]
    if data:
        bookkeeping.append(f"sweep.data={_quoted(str(Path(data).resolve()))}")
    # Hydra's entry point reads its arguments from sys.argv: the multirun is started as if typed.
    argv = [
        "xbench-sweep", "--config-dir", str(conf_dir()), "-m", f"experiment={name}", *overrides,
        *grid_overrides(cfg), *bookkeeping,
        f"hydra.sweep.dir={run_dir / '.hydra'}", "hydra.sweep.subdir=${hydra.job.num}",
        "hydra/job_logging=none", "hydra/hydra_logging=none",
    ]
    if launcher:
        argv.append(f"hydra/launcher={launcher}")
    saved = sys.argv
    sys.argv = argv
    previous = signal.signal(signal.SIGINT, _remember_ctrl_c)
    try:
        sweep_job()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise XbenchError(f"sweep {name} stopped: Hydra exited with {exc.code}") from None
    finally:
        sys.argv = saved
        signal.signal(signal.SIGINT, previous)
        write_report(run_dir)  # from whatever points exist, also after Ctrl-C
    if ctrl_c_pressed():  # pressed where Python swallowed the KeyboardInterrupt (a weakref callback)
        raise KeyboardInterrupt
    return run_dir


_ctrl_c = threading.Event()


def ctrl_c_pressed() -> bool:
    # A function, not the Event itself, in sweep_job: launchers pickle the job by value (joblib's
    # cloudpickle), and a lock does not pickle.
    return _ctrl_c.is_set()


def _remember_ctrl_c(signum: int, frame: Any) -> None:
    """Ctrl-C: raise KeyboardInterrupt as usual, and remember it, so that no further point starts
    even when the exception lands somewhere Python ignores it."""
    _ctrl_c.set()
    signal.default_int_handler(signum, frame)


def write_report(run_dir: Path, reference: bool = False) -> Path:
    """results.md in `run_dir` from the documents below it (for a study: its runs.json)."""
    from xbench.results.report import (context_section, convergence_section, environment_line, in_order,
                                       markdown_table, reference_table)

    docs = in_order(read_results(run_dir))
    env = next((d["env"] for d in docs if "env" in d), environment())
    title = ("Reproduction of the reference study" if reference
             else docs[0].get("experiment", run_dir.parent.name) if docs else run_dir.parent.name)
    parts = [f"# {title}\n", f"Run `{run_dir.name}`, {time.strftime('%Y-%m-%d %H:%M')}.\n",
             f"**Machine:** {environment_line(env)}\n",
             markdown_table(docs), context_section(docs), convergence_section(docs)]
    if reference:
        parts += ["\n## Reference study (Apple M-series GPU, MPS fp16, batch 128, concurrency 16)\n", reference_table()]
    return write_text(run_dir / "results.md", "\n".join(parts))


def run_all(overrides: list[str], force: bool = False, data: str | None = None, launcher: str | None = None) -> Path:
    """Every numbered experiment, then one combined report beside the reference figures."""
    study = (RESULTS_DIR / "study" / run_id()).resolve()
    study.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for name in (n for n in experiment_names() if n[:2].isdigit()):
            runs.append(run_sweep(name, overrides, force=force, data=data, launcher=launcher))
    finally:
        write_text(study / "runs.json", json.dumps([str(r) for r in runs], indent=2))
        write_report(study, reference=True)
    return study
