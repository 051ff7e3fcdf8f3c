"""Typed configuration: Hydra structured configs composed from `conf/`.

The dataclasses below are the schema. Hydra merges the YAML files of `conf/` and the
command-line overrides onto them in struct mode, so an unknown key or a value of the wrong
type fails at compose time naming the key. `validate()` then checks the values that a type
cannot express (a backend name, a positive batch size) and names the accepted ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xbench.errors import ConfigError

DEFAULT_MODEL = "xbench/minilm-l6-seeded"


class Choice(str, Enum):
    """A closed set of config values: Hydra rejects anything else at compose time, naming the
    key and the choices. Compares equal to, and prints as, its plain string."""

    def __str__(self) -> str:
        return str(self.value)


class WorkerMode(Choice):
    auto = "auto"
    thread = "thread"
    process = "process"


class Planner(Choice):
    cost = "cost"
    tokens = "tokens"


class LengthMix(Choice):
    msmarco = "msmarco"
    longtail = "longtail"
    fixed = "fixed"


@dataclass
class ModelInstanceConfig:
    name: str = DEFAULT_MODEL
    backend: str = "pytorch"
    device: str = "cpu"
    quantization: str = "fp32"
    max_length: int = 512
    trust_remote_code: bool = False
    # Packed execution (dense layers on real tokens only): null = the backend's default (on for
    # pytorch where the architecture allows it), true/false to force it.
    packed: Optional[bool] = None
    # CUDA graphs (pytorch, packed, CUDA, fp16/bf16): each batch shape bucket is captured once and
    # replayed, so launching kernels no longer holds the host. Opt-in (true): on an H200 the raw
    # forward gains 1.2-1.7x, but the pipeline gained only on long-tailed pairs (README, "The
    # changes measured"); scripts/gpu_check.sh measures both.
    cuda_graphs: Optional[bool] = None
    # How a pair becomes a score (xbench/recipes.py): auto (from the checkpoint, its xbench
    # marker and the known hub ids), classifier, qwen3-reranker, mxbai-rerank-v2,
    # bge-reranker-gemma, or yes-no (a causal LM read at `label_tokens` after `template`).
    # A checkpoint whose head would be drawn at random is refused, naming this key.
    scoring: str = "auto"
    # The instruction of recipes that take one (qwen3-reranker); null: the recipe's default.
    instruction: Optional[str] = None
    # scoring=yes-no: the prompt, holding {query} before {document} (and maybe {instruction}) ...
    template: Optional[str] = None
    # ... and the label tokens read at its last position: [negative, positive] or [positive].
    label_tokens: Optional[List[str]] = None
    # LLM rerankers: the tokens every row of a batch starts with (the prompt, the query) run once
    # and the rest attend to their keys and values (exact; backends/decoder.py). null: on.
    shared_prefix: Optional[bool] = None


@dataclass
class ModelPoolConfig:
    instances: List[ModelInstanceConfig] = field(default_factory=lambda: [ModelInstanceConfig()])
    # Workers per instance; each owns its own copy of the backend. null: 2 beside a CUDA model
    # (one worker packs and hands back a batch while the other's runs on the GPU: 1.37x the
    # pipeline on an H200 at fp16, MS MARCO-shaped), 1 on the CPU, whose cores one worker uses.
    workers: Optional[int] = None
    # Intra-op threads per worker; null splits the cores evenly between the workers.
    threads_per_worker: Optional[int] = None
    # thread: each worker owns a backend in this process (every backend releases the GIL while
    # it computes); process: the workers hand their batches to one backend in a spawned process
    # of its own, which runs them back to back, so launching a CUDA model's kernels never waits
    # on the GIL the tokenizer results, the batcher and the server need (threads_per_worker is
    # then that backend's); auto: process beside a CUDA model, thread elsewhere.
    mode: WorkerMode = WorkerMode.auto


@dataclass
class TokenizerPoolConfig:
    # null: beside a CUDA model, processes on half the cores up to 8 (8 took an H200's pipeline
    # to 40k pairs/s, 12 added nothing; one process tokenizes about 13k pairs/s); 1 on the CPU,
    # whose cores the model needs.
    workers: Optional[int] = None
    # TOKENIZERS_PARALLELISM: lets one encode_batch call use several Rust threads.
    parallelism: bool = True
    # thread: workers share the process (the Rust tokenizer releases the GIL);
    # process: each worker is a process with its own tokenizer, so its Python work never
    # holds the GIL a model worker needs (1.3x the pipeline on an H200 host at fp16);
    # auto: process when the model runs on CUDA, thread on the CPU.
    mode: WorkerMode = WorkerMode.auto


@dataclass
class BatchingConfig:
    enabled: bool = True
    max_batch_size: int = 32
    # Padded tokens (rows x longest row) one model batch may hold.
    max_batch_tokens: int = 16384
    # How long pending pairs may wait for a fuller batch while more are on their way.
    timeout_ms: float = 5.0
    # Sort pending pairs by length before cutting batches, so short pairs are not
    # padded to the longest one.
    length_bucketing: bool = True
    # cost: cut where the backend's calibrated cost model says the batches cost least (a
    # long-tailed mix splits into length groups; nothing to tune); tokens: greedy cut by
    # max_batch_size and max_batch_tokens alone.
    planner: Planner = Planner.cost


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    max_client_batch_size: int = 1000
    max_concurrent_requests: int = 512
    # Answer 429 (Retry-After from the estimate) when arrivals outrun the server: the queued work
    # (queued tokens / the measured scoring rate) would keep a new request waiting longer than
    # this, and admitting it would raise the requests in flight above the level the server has
    # been carrying (a closed loop of clients is never shed; serve/admission.py). 0: no bound.
    max_queue_wait_ms: float = 2000.0
    max_body_bytes: int = 8 * 1024 * 1024
    # A query is paired with every document: past this many characters it is a 413.
    max_query_chars: int = 16384
    # Slow clients: a request's headers, and then its body, must arrive within these.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    # Open connections served at once; past it uvicorn answers 503.
    max_connections: int = 2048
    # On SIGTERM: new requests get 503, requests in flight get this long to be scored.
    shutdown_grace_s: float = 30.0


@dataclass
class ExperimentConfig:
    # What a sweep point runs: tokenize-bench, infer-bench or pipeline-bench.
    command: str = "pipeline-bench"
    # Further grid axes for `xbench sweep`: config key -> values, e.g. {"tokenizer_pool.workers": [1, 2, 4]}.
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    batch_sizes: List[int] = field(default_factory=lambda: [128])
    concurrency_levels: List[int] = field(default_factory=lambda: [16])
    # A point is measured until it converges (bench/load.py): at least duration_s, in at least
    # `windows` windows, each at least duration_s / windows long and holding at least
    # min_requests_per_window requests; it ends when the last 3 windows agree within
    # stability_pct, or at max_duration_s (null: 3 x duration_s), reported unstable.
    duration_s: float = 10.0
    warmup_s: float = 2.0
    windows: int = 5
    min_requests_per_window: int = 20
    stability_pct: float = 10.0
    max_duration_s: Optional[float] = None
    # When set, measure exactly this many requests (in even windows) instead.
    requests: Optional[int] = None
    # Open loop: Poisson arrivals at this many requests/s instead of closed-loop clients.
    rate: Optional[float] = None
    # Open loop: gamma inter-arrival times of this shape (1: Poisson; 0.25: bursty; vLLM's rule).
    burstiness: float = 1.0
    # Bounds every request must meet at once to count toward goodput, e.g.
    # "latency_ms<=500,queue_ms<=100" (latency_ms, queue_ms, tokenize_ms, infer_ms, rest_ms).
    goodput: Optional[str] = None
    # Closed loop: a client that is shed (429/503 with Retry-After) waits that long before its
    # next request, as real clients do; false counts the answer and sends the next at once.
    honour_retry_after: bool = True
    seed: int = 0
    num_pairs: int = 4096


@dataclass
class WorkloadConfig:
    """The synthetic workload (ignored with --data): its length mix and its shape."""

    # msmarco: passages of N(56, 20) words; longtail: heavy-tailed, titles to 512-token chunks;
    # fixed: every passage fixed_words long.
    lengths: LengthMix = LengthMix.msmarco
    docs_per_query: int = 1
    fixed_words: int = 56
    # Documents per request from a distribution instead of the batch size (any workload, --data
    # included): "A:B" uniform, or "lognormal:mean=M,sd=S[,min=,max=]"; xbench load -b takes it.
    docs_per_request: Optional[str] = None


@dataclass
class SweepConfig:
    """Set by `xbench sweep` on each of its jobs (so launchers in other processes or machines get
    them too); not part of a point's identity."""

    run_dir: Optional[str] = None
    force: bool = False
    data: Optional[str] = None
    points: int = 0


@dataclass
class XbenchConfig:
    name: str = "adhoc"
    description: str = ""
    model_pool: ModelPoolConfig = field(default_factory=ModelPoolConfig)
    tokenizer_pool: TokenizerPoolConfig = field(default_factory=TokenizerPoolConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def _register() -> None:
    # The whole schema sits under the YAML of conf/config.yaml, so every group file and
    # every override is checked against these dataclasses.
    ConfigStore.instance().store(name="xbench_schema", node=XbenchConfig)


_register()


def conf_dir() -> Path:
    """The `conf/` folder: XBENCH_CONF_DIR, the copy inside an installed wheel, or the repo's."""
    if env := os.environ.get("XBENCH_CONF_DIR"):
        return Path(env).resolve()
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str] | None = None, experiment: str | None = None) -> DictConfig:
    """Compose `conf/config.yaml` (+ an experiment) with command-line overrides."""
    overrides = list(overrides or [])
    if experiment:
        overrides.insert(0, f"experiment={experiment}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as exc:  # Hydra raises many types; all are the user's config errors here.
        raise ConfigError(_one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OmegaConfBaseException) or "full_key" in text:
        text = text.split("\n")[0]
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text.splitlines()[0]}: {str(cause).strip().splitlines()[0]}"
    return " ".join(text.split())


BENCH_COMMANDS = ("tokenize-bench", "infer-bench", "pipeline-bench")


def validate(cfg: DictConfig) -> None:
    """Check what types cannot: names against their registries, sizes against zero."""
    from xbench.backends import check_instance  # the registry knows backends and devices
    from xbench.recipes import check_scoring

    def positive(key: str, value: Any) -> None:
        if value is None or value <= 0:
            raise ConfigError(f"{key}={value} must be a positive number")

    pool = cfg.model_pool
    if not pool.instances:
        raise ConfigError("model_pool.instances is empty: give at least one model instance")
    for i, inst in enumerate(pool.instances):
        check_instance(inst, key=f"model_pool.instances.{i}")
        check_scoring(inst, key=f"model_pool.instances.{i}")
        positive(f"model_pool.instances.{i}.max_length", inst.max_length)
    if pool.workers is not None:
        positive("model_pool.workers", pool.workers)
    if pool.threads_per_worker is not None:
        positive("model_pool.threads_per_worker", pool.threads_per_worker)
    if cfg.tokenizer_pool.workers is not None:
        positive("tokenizer_pool.workers", cfg.tokenizer_pool.workers)
    positive("batching.max_batch_size", cfg.batching.max_batch_size)
    positive("batching.max_batch_tokens", cfg.batching.max_batch_tokens)
    if cfg.batching.timeout_ms < 0:
        raise ConfigError(f"batching.timeout_ms={cfg.batching.timeout_ms} must be >= 0")
    exp = cfg.experiment
    if not exp.batch_sizes:
        raise ConfigError("experiment.batch_sizes is empty")
    if not exp.concurrency_levels:
        raise ConfigError("experiment.concurrency_levels is empty")
    for b in exp.batch_sizes:
        positive("experiment.batch_sizes", b)
    for c in exp.concurrency_levels:
        positive("experiment.concurrency_levels", c)
    positive("experiment.duration_s", exp.duration_s)
    if exp.warmup_s < 0:
        raise ConfigError(f"experiment.warmup_s={exp.warmup_s} must be >= 0")
    if exp.requests is not None:
        positive("experiment.requests", exp.requests)
    if exp.rate is not None:
        positive("experiment.rate", exp.rate)
    positive("experiment.burstiness", exp.burstiness)
    if cfg.workload.docs_per_request:
        from xbench.errors import DataError
        from xbench.workload import RequestSizes

        try:
            RequestSizes(str(cfg.workload.docs_per_request))
        except DataError as exc:
            raise ConfigError(f"workload.docs_per_request: {exc}") from None
    if exp.goodput is not None:
        from xbench.bench.stats import parse_goodput

        parse_goodput(exp.goodput)
    if exp.windows < 3:
        raise ConfigError(f"experiment.windows={exp.windows} must be at least 3 (stability compares the last 3)")
    positive("experiment.min_requests_per_window", exp.min_requests_per_window)
    positive("experiment.stability_pct", exp.stability_pct)
    if exp.max_duration_s is not None and exp.max_duration_s < exp.duration_s:
        raise ConfigError(f"experiment.max_duration_s={exp.max_duration_s} is below experiment.duration_s="
                          f"{exp.duration_s}: it is the limit a point may extend to while it converges")
    if exp.command not in BENCH_COMMANDS:
        raise ConfigError(f"experiment.command={exp.command!r} is not one of {', '.join(BENCH_COMMANDS)}")
    positive("experiment.num_pairs", exp.num_pairs)
    positive("workload.docs_per_query", cfg.workload.docs_per_query)
    positive("workload.fixed_words", cfg.workload.fixed_words)
    positive("server.max_client_batch_size", cfg.server.max_client_batch_size)
    positive("server.max_concurrent_requests", cfg.server.max_concurrent_requests)
    positive("server.max_body_bytes", cfg.server.max_body_bytes)
    if not 0 <= cfg.server.port <= 65535:
        raise ConfigError(f"server.port={cfg.server.port} is not a TCP port (0-65535)")


def to_dict(cfg: DictConfig) -> dict:
    """The composed config as plain JSON-able data (choices as their strings)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
