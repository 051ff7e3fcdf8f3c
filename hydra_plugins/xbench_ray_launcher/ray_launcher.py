"""A Hydra launcher that measures a sweep's points on a Ray cluster, one point per node at a time.

Each point is a Ray task that claims one unit of a custom node resource (`xbench_node`), which a
benchmark node advertises once (`ray start --resources '{"xbench_node": 1}'`): points run in
parallel across nodes and one after another on a node, so no two measurements share a machine.

The driver plans every point (its config, result path and whether an earlier run measured it),
sends the config to a node, and writes the document the node returns: workers need no shared
filesystem, and resume, `--force`, failed points and Ctrl-C behave as in a local sweep. A node
that dies mid-point has its task retried elsewhere by Ray (`max_retries`); the driver writes
files atomically and only from finished points, so none is ever half-written.

Hydra's own Ray launcher plugin writes results on the workers; that is why this one exists.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside
# sys.modules, where dataclasses cannot resolve string annotations.
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class XbenchRayLauncherConf:
    _target_: str = "hydra_plugins.xbench_ray_launcher.ray_launcher.XbenchRayLauncher"
    # ray://host:10001 or host:6379 of a running cluster; null: RAY_ADDRESS, or a cluster already
    # running on this machine, or else a one-node local cluster started for the sweep.
    address: Optional[str] = None
    # The custom resource a benchmark node advertises once; each point claims one unit of it.
    node_resource: str = "xbench_node"
    # Retries of a point whose node or worker died (Ray's task retries; a failed measurement is a result).
    max_retries: int = 3
    # Extra ray.init keyword arguments (e.g. runtime_env).
    init: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=XbenchRayLauncherConf,
                             provider="xbench_ray_launcher")


def measure_on_node(job: dict, data: Optional[bytes]) -> dict:
    """The task: measure one point from its plain config on whatever node Ray chose."""
    import tempfile

    from rich.console import Console

    from xbench.bench.sweep import measure_point, plan_point

    cfg = OmegaConf.create(job)
    if data is not None:  # the driver's data file, shipped: nodes need not share a filesystem
        path = Path(tempfile.mkdtemp(prefix="xbench-data-")) / "workload.jsonl"
        path.write_bytes(data)
        cfg.sweep.data = str(path)
    return measure_point(plan_point(cfg), Console(stderr=True, quiet=True))


class XbenchRayLauncher(Launcher):
    def __init__(self, address: Optional[str] = None, node_resource: str = "xbench_node", max_retries: int = 3,
                 init: Optional[dict] = None) -> None:
        self.address, self.node_resource, self.max_retries = address, node_resource, max_retries
        self.init_kwargs = dict(init or {})
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def _connect(self) -> Any:
        import ray

        if ray.is_initialized():
            return ray
        kwargs = {"log_to_driver": False, "include_dashboard": False, **self.init_kwargs}
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **kwargs)
        else:
            try:
                ray.init(address="auto", **kwargs)
            except ConnectionError:  # no cluster here: this machine is the one node
                ray.init(resources={self.node_resource: 1}, **kwargs)
        if ray.cluster_resources().get(self.node_resource, 0) < 1:
            raise RuntimeError(f"no node of the Ray cluster advertises the resource {self.node_resource!r}: start "
                               f"benchmark nodes with `ray start ... --resources '{{\"{self.node_resource}\": 1}}'`")
        return ray

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from rich.console import Console

        from xbench.bench.sweep import failed_document, plan_point, write_point

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        console = Console(stderr=True)
        ray = self._connect()
        measure = ray.remote(measure_on_node).options(num_cpus=0, resources={self.node_resource: 1},
                                                     max_retries=self.max_retries)
        data_cache: dict[str, bytes] = {}
        returns: list[JobReturn] = []
        pending: dict[Any, tuple[int, Any]] = {}  # task -> (index in returns, point)
        for idx, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{initial_job_idx + idx}"
                sweep_config.hydra.job.num = initial_job_idx + idx
            point = plan_point(sweep_config)
            returns.append(JobReturn(overrides=list(overrides), cfg=point.cfg, hydra_cfg=sweep_config,
                                     working_dir=str(point.out.parent), task_name=sweep_config.hydra.job.name,
                                     status=JobStatus.COMPLETED))
            head = f"[bold]point {initial_job_idx + idx + 1}/{point.cfg.sweep.points or '?'}[/] {point.label}"
            if found := point.measured():
                console.print(f"{head}\n  [dim]already measured: {found.name} (--force re-measures)[/]")
                continue
            data = point.cfg.sweep.data
            if data and data not in data_cache:
                data_cache[data] = Path(data).read_bytes()
            job = OmegaConf.to_container(point.cfg, resolve=True)
            pending[measure.remote(job, data_cache.get(data) if data else None)] = (len(returns) - 1, point)
            console.print(f"{head} [dim]sent to the cluster[/]")
        try:
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                _, point = pending.pop(done)
                try:
                    doc = ray.get(done)
                except Exception as exc:  # the node (or its worker) died past every retry
                    doc = failed_document(point, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                host = doc.get("env", {}).get("host", "?")
                if doc.get("error"):
                    console.print(f"  [red]failed on {host}:[/] {point.label}: {doc['error']}")
                else:
                    console.print(f"  [green]measured on {host}:[/] {point.label}: "
                                  f"{doc['summary']['pairs_per_s']:.1f} pairs/s")
                write_point(point, doc)
        except KeyboardInterrupt:  # finished points are written; the rest are cancelled, as locally
            for task in pending:
                ray.cancel(task, force=True)
            raise
        return returns
