"""The `xbench` command line. Thin: parse, compose the config, call one function, render."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from xbench.errors import XbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Measure and serve cross-encoder (reranker) models: pairs/s and latency percentiles per "
    "backend, precision, batch size, tokenizer workers and model workers.",
)
# Wide enough for the results table when output goes to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

OVERRIDES_HELP = (
    "Hydra overrides, e.g. model_pool.instances.0.quantization=bf16 tokenizer_pool.workers=2 "
    "batching.max_batch_size=64 (see conf/)."
)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an XbenchError into one red line and exit code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except XbenchError as exc:
            # escaped: messages list choices in brackets ("expected one of [cost, tokens]")
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def ramp_rates(ramp: str, steps: int) -> list[float]:
    """--ramp START:END:SECONDS -> the step rates, START to END inclusive."""
    from xbench.errors import ConfigError

    try:
        start, end, seconds = (float(x) for x in ramp.split(":"))
    except ValueError:
        raise ConfigError(f"--ramp {ramp!r}: write START:END:SECONDS (requests/s, requests/s, seconds)") from None
    if start <= 0 or end <= 0 or seconds <= 0 or steps < 2:
        raise ConfigError(f"--ramp {ramp!r} --steps {steps}: rates and seconds must be positive, steps at least 2")
    return [start + (end - start) * k / (steps - 1) for k in range(steps)]


def shortcut_overrides(batch: Optional[int], concurrency: Optional[int], rate: Optional[float],
                       duration: Optional[float], warmup: Optional[float], requests: Optional[int]) -> list[str]:
    """The convenience options, as the config overrides they stand for."""
    out = []
    if batch is not None:
        out.append(f"experiment.batch_sizes=[{batch}]")
    if concurrency is not None:
        out.append(f"experiment.concurrency_levels=[{concurrency}]")
    if rate is not None:
        out.append(f"experiment.rate={rate}")
    if duration is not None:
        out.append(f"experiment.duration_s={duration}")
    if warmup is not None:
        out.append(f"experiment.warmup_s={warmup}")
    if requests is not None:
        out.append(f"experiment.requests={requests}")
    return out


def _bench(command: str, overrides: Optional[List[str]], experiment: Optional[str], data: Optional[Path],
           out: Optional[Path], shortcuts: list[str]) -> None:
    from xbench.bench.runners import run_bench
    from xbench.config import compose_config
    from xbench.results.report import environment_line, render_table
    from xbench.results.store import environment
    from xbench.workload import make_workload

    cfg = compose_config([*(overrides or []), *shortcuts], experiment=experiment)
    workload = make_workload(data, cfg)
    docs = run_bench(command, cfg, workload, out=out, console=err_console)
    console.print(render_table(docs, title=f"{command}: {cfg.name}"))
    console.print(f"[dim]{environment_line(environment())}[/]")
    if docs and docs[0]["model"].get("relevance_trained") is False:
        console.print(f"[dim]Model: {docs[0]['model']['name']}, seeded (scores not relevance-trained; speed figures "
                      "transfer).[/]")
    for d in docs:
        console.print(f"[dim]wrote {d['_path']}[/]")


def bench_command(command: str, summary: str) -> None:
    """Register one measuring command; all three share their options."""

    @app.command(command, help=summary)
    @user_errors
    def _run(
        overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
        experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Experiment in conf/experiment/ to start from."),
        data: Optional[Path] = typer.Option(None, "--data", help="JSONL workload: {query, document} or {query, documents: [...]} per line. Default: seeded synthetic MS MARCO-shaped pairs."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Result JSON file (one point) or folder. Default: results/COMMAND/RUN-ID/."),
        batch: Optional[int] = typer.Option(None, "--batch", "-b", help="Pairs per request (one query with this many documents). Sets experiment.batch_sizes."),
        concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", help="Closed-loop clients, each sending its next request when the last returns. Sets experiment.concurrency_levels."),
        rate: Optional[float] = typer.Option(None, "--rate", help="Open loop: Poisson arrivals at this many requests/s; latency timed from each scheduled send."),
        duration: Optional[float] = typer.Option(None, "--duration", "-d", help="Seconds measured per point (experiment.duration_s)."),
        warmup: Optional[float] = typer.Option(None, "--warmup", help="Seconds of load before measuring (experiment.warmup_s)."),
        requests: Optional[int] = typer.Option(None, "--requests", "-n", help="Measure exactly this many requests instead of a duration."),
    ) -> None:
        _bench(command, overrides, experiment, data, out,
               shortcut_overrides(batch, concurrency, rate, duration, warmup, requests))


bench_command("tokenize-bench", "Measure the tokenizer pool alone (tokenizer_pool.workers, tokenizer_pool.parallelism).")
bench_command("infer-bench", "Measure the model stage alone (batcher + model pool) on pre-tokenized requests.")
bench_command("pipeline-bench", "Measure the whole in-process pipeline: tokenizer pool -> batcher -> model pool.")


@app.command("serve")
@user_errors
def serve_command(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (server.host; default 127.0.0.1, loopback only)."),
    port: Optional[int] = typer.Option(None, "--port", "-p", help="TCP port (server.port; default 8080)."),
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Experiment in conf/experiment/ to start from."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="Serve as replicas on Ray Serve: a cluster address (auto, ray://head:10001) or `local` to start one here."),
    replicas: int = typer.Option(1, "--replicas", help="With --ray: replicas, each with its own pipeline (the minimum when --max-replicas autoscales)."),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="With --ray: autoscale between --replicas and this on ongoing requests."),
    cpus_per_replica: float = typer.Option(1.0, "--cpus-per-replica", help="With --ray: CPUs each replica claims (and its model threads)."),
    targets_file: Optional[Path] = typer.Option(None, "--targets-file", help="With --ray: keep a Prometheus file_sd list of the replicas' metrics endpoints here."),
) -> None:
    """Serve the configured model(s) over the Cohere v1/v2 and TEI rerank APIs, with /health, /info, /metrics."""
    from xbench.config import compose_config
    from xbench.errors import ConfigError, require

    extra = ([f"server.host={host}"] if host else []) + ([f"server.port={port}"] if port is not None else [])
    cfg = compose_config([*(overrides or []), *extra], experiment=experiment)
    names = ", ".join(i.name for i in cfg.model_pool.instances)
    if ray_address is None:
        if replicas != 1 or max_replicas or targets_file:
            raise ConfigError("--replicas, --max-replicas and --targets-file need --ray ADDRESS (or --ray local)")
        from xbench.serve.app import serve

        err_console.print(f"xbench serve: http://{cfg.server.host}:{cfg.server.port} (loading {names}; /health is 503 until ready)")
        serve(cfg)
        return
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ConfigError(f"--replicas {replicas} / --max-replicas {max_replicas}: need 1 <= replicas <= max-replicas")
    require("--ray", ("ray",), "pip install 'xbench[ray]'")
    from xbench.serve.ray_serve import serve_on_ray

    err_console.print(f"xbench serve on Ray ({ray_address}): http://{cfg.server.host}:{cfg.server.port}, "
                      f"{replicas}{f'-{max_replicas}' if max_replicas else ''} replicas of {names}")
    serve_on_ray(cfg, ray_address, replicas, max_replicas, cpus_per_replica=cpus_per_replica, targets_file=targets_file)


@app.command("load")
@user_errors
def load_command(
    url: str = typer.Argument(..., help="Base URL of a rerank server (the API's path is added) or a full endpoint URL."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides (experiment.*).", show_default=False),
    api: str = typer.Option("cohere", "--api", help="The server's API: cohere (/v1/rerank), cohere-v2 (/v2/rerank), jina (/v1/rerank), tei (/rerank), infinity (/rerank), vllm (/rerank) or vllm-score (/score)."),
    model: Optional[str] = typer.Option(None, "--model", help="`model` field sent with each request (Infinity, vLLM and Jina need it)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="XBENCH_API_KEY", help="Bearer token sent to the server (the server's own key is server.api_key or XBENCH_SERVER_API_KEY)."),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL workload (default: seeded synthetic pairs)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Result JSON file (one point) or folder."),
    batch: Optional[str] = typer.Option(None, "--batch", "-b", help="Documents per request: a number, A:B (uniform), lognormal:mean=M,sd=S[,min=,max=] (seeded), or recorded (each --data line's own documents)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", help="Closed-loop clients."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Open loop: Poisson arrivals at this many requests/s."),
    duration: Optional[float] = typer.Option(None, "--duration", "-d", help="Seconds measured per point."),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Seconds of load before measuring."),
    requests: Optional[int] = typer.Option(None, "--requests", "-n", help="Measure exactly this many requests."),
    slo: Optional[str] = typer.Option(None, "--slo", help="Find the highest rate meeting a bound, e.g. p99_ms=500."),
    generators: int = typer.Option(1, "--generators", help="Generator processes sharing the load (concurrency or rate split between them), merged into one result."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="Run the --generators as Ray actors on this cluster (e.g. auto, ray://head:10001) instead of local processes."),
    burstiness: Optional[float] = typer.Option(None, "--burstiness", help="Open loop: gamma arrivals of this shape at --rate (1 Poisson, the default; 0.25 bursty)."),
    goodput_bounds: Optional[str] = typer.Option(None, "--goodput", help="Bounds every request must meet at once to count as good, e.g. latency_ms<=500,queue_ms<=100 (latency_ms, queue_ms, tokenize_ms, infer_ms, rest_ms)."),
    ramp: Optional[str] = typer.Option(None, "--ramp", help="Open loop at rates rising linearly START:END:SECONDS (requests/s, in --steps steps), one result per step and a chart."),
    steps: int = typer.Option(8, "--steps", help="--ramp: rate steps."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Replay a JSONL of {timestamp, query, documents} at its own times (open loop, every request counted)."),
    speedup: float = typer.Option(1.0, "--speedup", help="--trace: replay this many times faster."),
    records: Optional[Path] = typer.Option(None, "--records", help="Write one JSON line per measured request (send and end times, status, documents, tokens, the server's timings)."),
    retry_after: bool = typer.Option(True, "--retry-after/--no-retry-after", help="Closed loop: a client that is shed waits the server's Retry-After before its next request (--no-retry-after: count it and send the next at once)."),
) -> None:
    """Drive any rerank HTTP endpoint (xbench serve, TEI, Infinity, vLLM, ...) with the same load generator."""
    from xbench.bench.http import HttpTarget
    from xbench.bench.runners import grid, run_points
    from xbench.bench.slo import slo_search
    from xbench.config import compose_config
    from xbench.errors import ConfigError
    from xbench.results.report import render_table, stages_table
    from xbench.workload import make_workload

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"URL {url!r} must start with http:// or https://")
    recorded = batch == "recorded"
    if recorded and data is None:
        raise ConfigError("--batch recorded sends each --data line's documents as they are: give --data")
    sizes: list[str] = []
    if batch is not None and not recorded and not batch.strip().isdigit():  # a distribution: its mean labels it
        from xbench.errors import DataError
        from xbench.workload import RequestSizes

        try:
            typical = RequestSizes(batch).typical
        except DataError as exc:
            raise ConfigError(f"--batch: {exc}") from None
        sizes = [f"workload.docs_per_request='{batch}'", f"experiment.batch_sizes=[{typical}]"]
    fixed = int(batch) if batch is not None and batch.strip().isdigit() else None
    rates: list[float] = []
    timing = shortcut_overrides(fixed, concurrency, rate, duration, warmup, requests)
    if ramp is not None:  # each step an open-loop point of its own, measured for its share of the time
        if rate or slo or trace:
            raise ConfigError("--ramp sets the rates: drop --rate, --slo and --trace")
        rates = ramp_rates(ramp, steps)
        step_s = float(ramp.split(":")[2]) / steps
        timing = [*shortcut_overrides(fixed, None, None, None, None, None), f"experiment.duration_s={step_s}",
                  f"experiment.max_duration_s={step_s}", f"experiment.warmup_s={warmup or 0}"]
    cfg = compose_config([*(overrides or []), *timing, *sizes,
                          *([] if retry_after else ["experiment.honour_retry_after=false"]),
                          *([f"experiment.burstiness={burstiness}"] if burstiness is not None else []),
                          *([f"experiment.goodput='{goodput_bounds}'"] if goodput_bounds else [])])
    if records is not None:
        from xbench.errors import require
        from xbench.results.store import check_writable

        if records.suffix == ".parquet":
            require(f"--records {records.name}", ["pyarrow"], "pip install pyarrow (or write .jsonl)")
        check_writable(records.parent)
    schedule = None
    if trace is not None:
        from xbench.workload import load_trace

        if data is not None or rate or slo:
            raise ConfigError("--trace sets the requests and their times: drop --data, --rate and --slo")
        workload, schedule = load_trace(trace, speedup)
    else:
        workload = make_workload(data, cfg)
        workload.as_recorded = recorded
    target: Any = HttpTarget(url, api, model=model, api_key=api_key)
    if generators < 1:
        raise ConfigError(f"--generators {generators}: must be at least 1")
    if ray_address and generators == 1:
        raise ConfigError("--ray runs several generators: give --generators N (N > 1)")
    if generators > 1:
        from xbench.bench.generators import GeneratorFleet

        target = GeneratorFleet(target, generators, ray_address)
    if slo:
        docs, search = slo_search("load", cfg, target, workload, int(cfg.experiment.batch_sizes[0]), slo, out, err_console)
    else:
        if records is not None:
            records.unlink(missing_ok=True)  # this run's requests only
        as_sent = round(sum(map(len, workload.documents)) / len(workload.documents))  # the mean, to label it
        if schedule:
            points = [(as_sent, 1, None)]
        elif recorded:
            points = [(as_sent, c, cfg.experiment.rate) for _, c in grid(cfg)]
        elif rates:
            points = [(int(cfg.experiment.batch_sizes[0]), 1, r) for r in rates]
        else:
            points = [(b, c, cfg.experiment.rate) for b, c in grid(cfg)]
        docs = run_points("load", cfg, target, workload, points, out, err_console, records=records, schedule=schedule)
    console.print(render_table(docs, title=f"load: {target.url} ({api})" + (f", {generators} generators" if generators > 1 else "")))
    if (split := stages_table(docs, title="where the time went (the server's timing headers)")) is not None:
        console.print(split)
    for d in docs:
        if d.get("http_status"):
            console.print(f"[dim]{d['_path']}: HTTP status counts {d['http_status']}[/]")
        lag = d.get("load", {}).get("send_lag_ms")
        if lag and d["load"].get("mode") == "trace":
            console.print(f"trace replayed: {d['load']['requests']} requests over {d['load']['span_s']:.1f} s, sent "
                          f"{lag['p50']:.1f} ms (p50) / {lag['p99']:.1f} ms (p99) after their recorded times")
        if d.get("goodput"):
            g = d["goodput"]
            console.print(f"goodput ({', '.join(f'{k}<={v:g}' for k, v in g['bounds'].items())}): "
                          f"{g['requests_per_s']:.3g} requests/s, {g['fraction']:.0%} of {g['requests']} requests")
        busy = d.get("load", {}).get("generator_cpu", {}).get("cores", 0)
        if busy > 0.5:
            console.print(f"[yellow]the load generator itself used {busy:.2f} cores[/] of this machine's "
                          f"{os.cpu_count()}: where it shares them with the server, it is part of what was measured")
        if d.get("summary", {}).get("shed_fraction", 0) > 0.5:
            console.print(f"[bold yellow]most requests were shed:[/] {d['summary']['shed_fraction']:.0%} answered 429 "
                          "(the server's admission bound), so these figures describe a server turning load away")
    if slo:
        tried = ", ".join(f"{rate:.3g}{'' if met else ' (missed)'}" for rate, met in search.tried)
        console.print(f"highest rate meeting {slo}: "
                      + (f"{search.best:.3g} requests/s" if search.best else "none of the rates tried")
                      + f" (requests/s tried: {tried})")
    if rates and docs:
        from xbench.results.plot import plot_ramp

        console.print(f"[dim]chart: {plot_ramp(docs, Path(docs[0]['_path']).parent / 'ramp.png')}[/]")
    if docs and not any(d.get("summary", {}).get("requests") for d in docs):
        err_console.print("[bold red]error:[/] no request succeeded; see the HTTP status counts above")
        raise typer.Exit(1)


@app.command("sweep")
@user_errors
def sweep_command(
    name: Optional[str] = typer.Argument(None, help="Experiment in conf/experiment/ (see --list)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP + " Comma lists sweep more values.", show_default=False),
    all_experiments: bool = typer.Option(False, "--all", help="Run every numbered experiment and write one combined table beside the reference study."),
    force: bool = typer.Option(False, "--force", help="Re-measure points that already have a result."),
    new: bool = typer.Option(False, "--new", help="Start a new run folder instead of resuming the latest one."),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL workload for every point."),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="Hydra launcher plugin: basic (default, one point after another), joblib, ray (a Ray cluster, one point per node at a time; hydra.launcher.address=...), submitit_local, submitit_slurm."),
    list_: bool = typer.Option(False, "--list", help="List the experiments and exit."),
) -> None:
    """Run an experiment's grid (a Hydra multirun), write one JSON per point and results.md."""
    from xbench.bench.sweep import run_all, run_sweep
    from xbench.config import compose_config, experiment_names

    if list_ or (not name and not all_experiments):
        for n in experiment_names():
            console.print(f"{n:24s} {compose_config([], experiment=n).name}", highlight=False)
        return
    if data is not None and not data.is_file():
        raise XbenchError(f"--data {data}: no such file")
    if all_experiments:
        if name:
            overrides = [name, *(overrides or [])]
        folder = run_all(list(overrides or []), force=force, data=str(data) if data else None, launcher=launcher)
    else:
        if name not in experiment_names():
            raise XbenchError(f"experiment {name!r} not found; choose one of {', '.join(experiment_names())}")
        folder = run_sweep(name, list(overrides or []), force=force, new_run=new, data=str(data) if data else None,
                           launcher=launcher)
    _print_report(folder)


def _print_report(folder: Path) -> None:
    from xbench.results.report import render_table
    from xbench.results.store import read_results

    docs = read_results(folder)
    console.print(render_table(docs, title=f"{folder}"))
    console.print(f"[dim]report: {folder / 'results.md'}[/]")


@app.command("plot")
@user_errors
def plot_command(
    path: Path = typer.Argument(Path("results"), help="A result file, run folder, or results/."),
    out: Path = typer.Option(Path("plots"), "--out", "-o", help="Folder for the PNG charts and index.html."),
) -> None:
    """Draw charts (PNG) and a self-contained plots/index.html report from result files."""
    from xbench.results.plot import plot_results

    written = plot_results(path, out)
    for p in written:
        console.print(f"wrote {p}")


@app.command("compare")
@user_errors
def compare_command(
    a: Path = typer.Argument(..., help="Baseline: a result file or folder."),
    b: Path = typer.Argument(..., help="Candidate: a result file or folder."),
    threshold: float = typer.Option(0.15, "--threshold", help="Flag a change of pairs/s or p99 larger than this fraction (run-to-run noise on shared 2-core machines reaches ~15%)."),
    fail: bool = typer.Option(False, "--fail-on-regression", help="Exit 1 when any matching point regressed past the threshold."),
) -> None:
    """Two runs side by side: the ratio per matching point, flagged past the noise threshold."""
    from xbench.results.compare import compare, render

    rows = compare(a, b, threshold)
    console.print(render(rows, a, b, threshold))
    if fail and any(r["regression"] for r in rows):
        raise typer.Exit(1)


@app.command("report")
@user_errors
def report_command(
    path: Path = typer.Argument(..., help="A result file or run folder (or results/)."),
    fmt: str = typer.Option("md", "--format", "-f", help="md (tables and what was measured), csv or json (one row per point, with the 95% interval bounds)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of standard output."),
) -> None:
    """Export a run's points for spreadsheets, CI dashboards or a pull request."""
    from xbench.errors import DataError
    from xbench.results.report import export_text
    from xbench.results.store import read_results, write_text

    docs = read_results(path)
    if not docs:
        raise DataError(f"{path}: no result documents there")
    text = export_text(docs, fmt)
    if out is None:
        sys.stdout.write(text)
    else:
        write_text(out, text)
        err_console.print(f"wrote {out}")


@app.command("config")
@user_errors
def show_config(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Experiment in conf/experiment/."),
) -> None:
    """Print the fully composed config (what a run would record), and exit."""
    from omegaconf import OmegaConf

    from xbench.config import compose_config

    console.print(OmegaConf.to_yaml(compose_config(overrides, experiment=experiment)), highlight=False)


@app.command("backends")
def backends_matrix(
    measure: bool = typer.Option(False, "--measure", help="Also time one FFN-shaped GEMM per precision on this "
                                 "CPU: the ceiling each precision's speed-up can reach here (about 20 s)."),
) -> None:
    """Print which backend x precision x device combinations this machine can run."""
    from rich.table import Table

    from xbench.backends import PRECISIONS, REGISTRY, available_devices

    from xbench.env import cpu_features, cpu_name, cpu_precisions

    present, flags = set(available_devices()), set(cpu_features())
    try:  # MLX names Apple's GPU "gpu"; we call it mps, as torch does
        import mlx.core as mx

        mlx_gpu = bool(mx.metal.is_available())
    except Exception:
        mlx_gpu = False
    table = Table(title="Backends on this machine", header_style="bold")
    table.add_column("backend")
    table.add_column("device")
    for p in PRECISIONS:
        table.add_column(p, justify="center")
    table.add_column("notes")
    for spec in REGISTRY.values():
        missing = spec.missing()
        for device in spec.devices:
            here = device in present or (spec.name == "mlx" and device == "mps" and mlx_gpu)
            cells = []
            for p in PRECISIONS:
                if not spec.supports(p, device):
                    cells.append("[dim]-[/]")
                elif missing:
                    cells.append("[yellow]extra[/]")
                elif not here:
                    cells.append("[dim]no device[/]")
                elif device == "cpu" and not set(dict(spec.cpu_flags).get(p, flags)) & flags:
                    cells.append("[dim]no cpu flag[/]")
                else:
                    cells.append("[green]yes[/]")
            note = spec.install_hint(missing) if missing else spec.summary
            table.add_row(spec.name, device, *cells, note)
    console.print(table)
    console.print("[dim]yes: runs here · extra: install the named extra · no device: device absent · no cpu flag: "
                  "this CPU lacks its instructions · -: not supported[/]")
    cpu = Table(title=f"Precisions on this CPU ({cpu_name()})", header_style="bold")
    cpu.add_column("precision")
    cpu.add_column("computed as")
    for precision, how in cpu_precisions().items():
        cpu.add_row(precision, f"[green]{how}[/]" if how.startswith("native") else f"[yellow]{how}[/]")
    console.print(cpu)
    if measure:
        from xbench.bench.ceilings import ceilings_table, gemm_ceilings
        from xbench.core.model_pool import threads_per_worker

        threads = threads_per_worker(1, None)
        with console.status("timing one GEMM per precision ..."):
            rates = gemm_ceilings(threads)
        console.print(ceilings_table(rates, threads))


@app.command("score")
@user_errors
def score(
    data: Path = typer.Option(..., "--data", help="JSONL of {query, document} or {query, documents: [...]} lines."),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL written line for line: {score} or {scores: [...]}."),
    raw_scores: bool = typer.Option(False, "--raw-scores", help="Write raw logits instead of sigmoid scores."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
) -> None:
    """Score every pair of a JSONL file with the configured backend and precision."""
    from xbench.bench.score import score_file
    from xbench.config import compose_config

    cfg = compose_config(overrides)
    lines, pairs, seconds = score_file(cfg, data, out, raw_scores=raw_scores, console=err_console)
    console.print(f"scored {pairs} pairs on {lines} lines in {seconds:.1f}s ({pairs / max(seconds, 1e-9):.1f} pairs/s) -> {out}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
