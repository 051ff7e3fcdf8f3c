"""Benchmark: xbench against what a user would pick instead, on the same pairs, in one run.

Every path scores the same requests (one query with `batch` documents, from strings, one call
per request, tokenization included) on the same local model folder, offline, with the same
intra-op threads:

  sentence-transformers  CrossEncoder.predict (fp32), the baseline (= 1.00)
  optimum                ORTModelForSequenceClassification. fp32 on a graph fused by ORTOptimizer as
                         xbench's ONNX graph is (level 1, the same fusions, EmbedLayerNormalization
                         included); int8 dynamic (avx2 config) on the plain export, as optimum's docs
                         do: its quantizer cannot read the fused graph (fused ops carry no shape
                         types; xbench's quantizer is told they are fp32)
  fastembed              TextCrossEncoder on optimum's int8 ONNX file, from a local folder
  flashrank              Ranker on optimum's int8 ONNX file, its session given the pinned threads
  CTranslate2            Encoder (float32 and int8) + the checkpoint's head, as its docs show
  OpenVINO               the runtime alone on the IR `ov.convert_model` makes of the checkpoint (the
                         same IR xbench's backend caches; int8 by NNCF static quantization), the
                         HF tokenizer per request: out of the box (no precision hint), f32 pinned,
                         bf16, int8
  xbench                 the pipeline (Pipeline.submit per request) on its own backends

On top, "+ sorted" rows give each padded peer the obvious remedy for long-tailed requests: every
pair of every request scored in batches of `batch` sorted by length (one call per batch), so the
table separates what sorting alone wins from what packing and cost-model cutting win. OpenVINO's
sorted rows also pad each batch to a multiple of 16 tokens (the tokenizer's `pad_to_multiple_of`),
which its bf16 and int8 kernels run faster than one token less, as xbench's calibration finds.
xbench's counterpart, "+ all at once", submits every request together and lets the pipeline batch
across them.

The "computed" column is what the hardware computed, read from the engine where it says (an
OpenVINO model compiled without a hint computes in bf16 on CPUs with AVX512-BF16 or AMX).
Rounds are interleaved, so drift hits every path alike, after one untimed round in which every
path meets every batch shape once. Fidelity: Spearman of each path's scores
against transformers fp32 over every pair. Runs in `make peers`' virtualenv (optimum and fastembed
pin transformers below ours); a peer that is not installed is reported as such, never dropped.

    .venv-peers/bin/python benchmarks/peers.py [--pairs 256] [--rounds 3] [--lengths longtail] [--only 'A,B']
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from xbench.backends.torch_backend import TorchBackend
from xbench.bench.batches import collate
from xbench.bench.runners import progress_bar
from xbench.config import compose_config
from xbench.core.pipeline import Pipeline
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.env import native_flags
from xbench.checkpoints import resolve_model
from xbench.results.store import environment, write_json
from xbench.workload import Pair, Request, synthetic

console = Console(width=170)
ScorePairs = Callable[[list[Pair]], np.ndarray]  # one call: these pairs' scores (any monotone scale)
INT8_DYNAMIC = "int8 matmuls (dynamic), fp32 elsewhere"


@dataclass
class Scorer:
    score: ScorePairs
    computed: str
    padded: bool = True  # pads each call to its longest pair: sorting by length helps it
    # xbench: every request submitted at once, the pipeline batching across them (its answer to
    # "+ sorted"); None for the peers
    submit_all: Callable[[list[list[Pair]]], list[np.ndarray]] | None = None
    # what "+ sorted" calls, where the careful user also tunes the tokenizer; None: `score`
    sorted_score: ScorePairs | None = None


def sentence_transformers(model_dir: Path, threads: int) -> Scorer:
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    model = CrossEncoder(str(model_dir), device="cpu")
    return Scorer(lambda pairs: np.asarray(model.predict(pairs, batch_size=len(pairs), show_progress_bar=False)),
                 "fp32" if torch.get_float32_matmul_precision() == "highest" else "fp32 (reduced matmul precision)")


def optimum_folder(model_dir: Path, work: Path, int8: bool) -> Path:
    """optimum's export: fp32 fused by ORTOptimizer with xbench's fusions, int8 quantized from the
    plain export."""
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig, OptimizationConfig

    exported, fused, quantized = work / "optimum-export", work / "optimum-fp32", work / "optimum-int8"
    if not exported.is_dir():
        ORTModelForSequenceClassification.from_pretrained(str(model_dir), export=True).save_pretrained(exported)
    if not int8 and not fused.is_dir():
        ORTOptimizer.from_pretrained(exported).optimize(
            OptimizationConfig(optimization_level=1, disable_embed_layer_norm_fusion=False), save_dir=fused)
    if int8 and not quantized.is_dir():
        ORTQuantizer.from_pretrained(exported).quantize(AutoQuantizationConfig.avx2(is_static=False, per_channel=True),
                                                        save_dir=quantized)
    return quantized if int8 else fused


def optimum(model_dir: Path, threads: int, work: Path, int8: bool) -> Scorer:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    folder = optimum_folder(model_dir, work, int8)
    model = ORTModelForSequenceClassification.from_pretrained(folder, file_name=next(folder.glob("*.onnx")).name,
                                                              session_options=opts)
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def score(pairs: list[Pair]) -> np.ndarray:
        enc = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation=True,
                  max_length=512, return_tensors="pt")
        return model(**enc).logits[:, 0].detach().numpy()

    return Scorer(score, INT8_DYNAMIC if int8 else "fp32")


def int8_onnx_folder(model_dir: Path, work: Path, file_name: str) -> Path:
    """optimum's int8 ONNX file with the tokenizer files, laid out as fastembed/flashrank read them."""
    folder = work / file_name.replace("/", "_")
    (folder / Path(file_name).parent).mkdir(parents=True, exist_ok=True)
    shutil.copy(next(optimum_folder(model_dir, work, int8=True).glob("*.onnx")), folder / file_name)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "vocab.txt"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, folder / name)
    return folder


def fastembed(model_dir: Path, threads: int, work: Path) -> Scorer:
    from fastembed.common.model_description import ModelSource
    from fastembed.rerank.cross_encoder import TextCrossEncoder

    folder = int8_onnx_folder(model_dir, work, "onnx/model.onnx")
    name = "xbench/local-cross-encoder"
    if name not in {m["model"] for m in TextCrossEncoder.list_supported_models()}:
        TextCrossEncoder.add_custom_model(model=name, sources=ModelSource(hf="xbench/local"), model_file="onnx/model.onnx")
    model = TextCrossEncoder(name, specific_model_path=str(folder), threads=threads)

    def score(pairs: list[Pair]) -> np.ndarray:  # rerank_pairs: a request's pairs, or sorted pairs of many
        return np.fromiter(model.rerank_pairs(pairs, batch_size=len(pairs)), dtype=np.float32)

    return Scorer(score, INT8_DYNAMIC)


def flashrank(model_dir: Path, threads: int, work: Path) -> Scorer:
    import onnxruntime as ort
    from flashrank import Ranker, RerankRequest

    name = "ms-marco-MiniLM-L-12-v2"  # a name flashrank knows; its file is optimum's int8 graph
    file_name = "flashrank-MiniLM-L-12-v2_Q.onnx"
    folder = int8_onnx_folder(model_dir, work, file_name)
    cache = work / "flashrank"
    shutil.rmtree(cache / name, ignore_errors=True)
    shutil.copytree(folder, cache / name)
    ranker = Ranker(model_name=name, cache_dir=str(cache), max_length=512, log_level="WARNING")
    opts = ort.SessionOptions()  # flashrank takes no thread count: its session, with the pinned threads
    opts.intra_op_num_threads = threads
    ranker.session = ort.InferenceSession(str(cache / name / file_name), opts, providers=["CPUExecutionProvider"])

    def score(pairs: list[Pair]) -> np.ndarray:  # one query per call: flashrank reranks passages of one query
        query = pairs[0][0]
        assert all(q == query for q, _ in pairs), "flashrank scores one query's passages per call"
        out = ranker.rerank(RerankRequest(query=query, passages=[{"id": i, "text": d} for i, (_, d) in enumerate(pairs)]))
        scores = np.empty(len(out), dtype=np.float32)
        for x in out:
            scores[x["id"]] = x["score"]
        return scores

    return Scorer(score, INT8_DYNAMIC)


def ctranslate2(model_dir: Path, threads: int, compute_type: str) -> Scorer:
    import ctranslate2 as ct2
    from tokenizers import Tokenizer

    from xbench.backends.ct2_backend import Head, ensure_converted

    encoder = ct2.Encoder(str(ensure_converted(model_dir)), device="cpu", compute_type=compute_type,
                          intra_threads=threads)
    head = Head(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # CTranslate2 takes ragged lists: padding ids would count as tokens
    tok.enable_truncation(512)

    def score(pairs: list[Pair]) -> np.ndarray:
        enc = tok.encode_batch(pairs)
        out = encoder.forward_batch([e.ids for e in enc], token_type_ids=[e.type_ids for e in enc])
        return head(np.asarray(out.pooler_output))[:, 0]

    return Scorer(score, "fp32" if compute_type == "float32" else "int8 matmuls, fp32 elsewhere", padded=False)


def openvino(model_dir: Path, threads: int, precision: str | None) -> Scorer:
    """OpenVINO alone: `precision` None compiles with no precision hint, as a user would out of the box."""
    import openvino as ov
    from transformers import AutoTokenizer

    from xbench.backends.openvino_backend import HINTS, OpenVinoBackend, computed_precision, ir_path

    OpenVinoBackend(str(model_dir), "cpu", precision or "fp32", threads=1)  # converts (and quantizes) once
    config: dict = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = HINTS[precision]
    compiled = ov.Core().compile_model(str(ir_path(model_dir, precision or "fp32")), "CPU", config)
    request = compiled.create_infer_request()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    names = {i.get_any_name() for i in compiled.inputs}

    def score(pairs: list[Pair], multiple: int | None = None) -> np.ndarray:
        enc = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation=True, max_length=512,
                  pad_to_multiple_of=multiple, return_tensors="np")
        out = request.infer({k: v for k, v in enc.items() if k in names})
        return next(iter(out.values()))[:, 0]

    return Scorer(score, computed_precision(compiled, precision or "fp32"),
                  sorted_score=lambda pairs: score(pairs, multiple=16))


def xbench(overrides: list[str]) -> tuple[Scorer, Pipeline]:
    pipe = Pipeline.from_config(compose_config(overrides)).start()
    computed = pipe.describe()["engine"].get("computed", "?")

    def submit_all(calls: list[list[Pair]]) -> list[np.ndarray]:
        jobs = [pipe.submit(pairs) for pairs in calls]
        return [job.result().logits for job in jobs]

    return Scorer(lambda pairs: pipe.submit(pairs).result().logits, computed, padded=False, submit_all=submit_all), pipe


def by_request(requests: list[Request]) -> list[list[int]]:
    """Pair positions a call at a time: one call per request."""
    calls, start = [], 0
    for r in requests:
        calls.append(list(range(start, start + len(r.pairs))))
        start += len(r.pairs)
    return calls


def by_length(pairs: list[Pair], batch: int) -> list[list[int]]:
    """Pair positions a call at a time: every pair sorted by length (characters), cut into batches."""
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]) + len(pairs[k][1]))
    return [order[k:k + batch] for k in range(0, len(order), batch)]


def run_calls(scorer: Scorer, pairs: list[Pair], calls: list[list[int]], at_once: bool) -> np.ndarray:
    out = np.empty(len(pairs), dtype=np.float64)
    batches = [[pairs[k] for k in call] for call in calls]
    scores = scorer.submit_all(batches) if at_once else [scorer.score(batch) for batch in batches]
    for call, got in zip(calls, scores):
        out[call] = np.asarray(got, dtype=np.float64).reshape(-1)
    return out


def main(
    pairs: int = typer.Option(256, help="Pairs scored by every path in every round."),
    batch: int = typer.Option(32, help="Documents per request (one call each)."),
    rounds: int = typer.Option(3, help="Interleaved rounds."),
    lengths: str = typer.Option("longtail", help="Length mix of the synthetic pairs: longtail, msmarco or fixed."),
    threads: int = typer.Option(2, help="Intra-op threads for every path."),
    sort: bool = typer.Option(True, help="Add a '+ sorted' row for every padded peer."),
    only: str = typer.Option("", help="Comma-separated paths to run (sentence-transformers fp32, the baseline, "
                                      "always runs), e.g. 'CTranslate2 float32,xbench pytorch fp32'."),
    out: Path = typer.Option(Path("results/benchmarks/peers.json"), "--out", "-o"),
) -> None:
    model_dir = resolve_model("default").path
    workload = synthetic(pairs, seed=11, docs_per_query=batch, lengths=lengths)
    requests = [workload.request(i, batch) for i in range(pairs // batch)]
    every = [pair for r in requests for pair in r.pairs]
    work = Path(tempfile.mkdtemp(prefix="xbench-peers-"))
    bf16 = bool(native_flags("bf16"))
    builders: dict[str, Callable[[], Scorer]] = {
        "sentence-transformers fp32": lambda: sentence_transformers(model_dir, threads),
        "optimum (ORT) fp32": lambda: optimum(model_dir, threads, work, int8=False),
        "optimum (ORT) int8": lambda: optimum(model_dir, threads, work, int8=True),
        "fastembed int8": lambda: fastembed(model_dir, threads, work),
        "flashrank int8": lambda: flashrank(model_dir, threads, work),
        "CTranslate2 float32": lambda: ctranslate2(model_dir, threads, "float32"),
        "CTranslate2 int8": lambda: ctranslate2(model_dir, threads, "int8_float32"),
        "OpenVINO out of the box": lambda: openvino(model_dir, threads, None),
        "OpenVINO fp32": lambda: openvino(model_dir, threads, "fp32"),
        **({"OpenVINO bf16": lambda: openvino(model_dir, threads, "bf16")} if bf16 else {}),
        "OpenVINO int8": lambda: openvino(model_dir, threads, "int8"),
    }
    ours = {
        "xbench pytorch fp32": [],
        **({"xbench pytorch bf16": ["model_pool.instances.0.quantization=bf16"]} if bf16 else {}),
        "xbench pytorch int8": ["model_pool.instances.0.quantization=int8"],
        "xbench onnx fp32": ["model_pool.instances.0.backend=onnx"],
        "xbench onnx int8": ["model_pool.instances.0.backend=onnx", "model_pool.instances.0.quantization=int8"],
        "xbench ctranslate2 int8": ["model_pool.instances.0.backend=ctranslate2", "model_pool.instances.0.quantization=int8"],
        "xbench openvino fp32": ["model_pool.instances.0.backend=openvino"],
        **({"xbench openvino bf16": ["model_pool.instances.0.backend=openvino",
                                     "model_pool.instances.0.quantization=bf16"]} if bf16 else {}),
        "xbench openvino int8": ["model_pool.instances.0.backend=openvino", "model_pool.instances.0.quantization=int8"],
    }
    if only:
        wanted = {name.strip() for name in only.split(",")} | {"sentence-transformers fp32"}
        if unknown := wanted - builders.keys() - ours.keys():
            raise typer.BadParameter(f"no such path: {', '.join(sorted(unknown))}; paths: "
                                     f"{', '.join([*builders, *ours])}", param_hint="--only")
        builders = {k: v for k, v in builders.items() if k in wanted}
        ours = {k: v for k, v in ours.items() if k in wanted}
    paths: dict[str, Scorer] = {}
    pipelines: dict[str, Pipeline] = {}
    missing = {}
    with console.status("loading every path (conversions, exports and calibrations run once) ..."):
        for name, build in builders.items():
            try:
                paths[name] = build()
            except ImportError as exc:
                missing[name] = f"not installed ({exc.name}): make peers"
        for name, ov in ours.items():
            paths[name], pipelines[name] = xbench([*ov, f"model_pool.threads_per_worker={threads}"])
    # Each path's calls: one per request; with --sort, padded peers also score sorted batches across
    # requests, and xbench gets every request at once.
    runs = {name: (path, by_request(requests), False) for name, path in paths.items()}
    if sort:
        runs.update({f"{name} + sorted": (replace(path, score=path.sorted_score or path.score), by_length(every, batch),
                                          False) for name, path in paths.items()
                     if path.padded and not name.startswith(("flashrank", "fastembed"))})
        runs.update({f"{name} + all at once": (path, by_request(requests), True) for name, path in paths.items()
                     if path.submit_all})
    # The reference: transformers fp32, padded, on the same pairs.
    tok = TokenizerPool(load_tokenizer(model_dir, 512))
    reference = TorchBackend(str(model_dir), "cpu", "fp32", threads, packed=False)
    ref = np.concatenate([reference.forward(*collate(enc.ids, enc.type_ids))
                          for enc in (tok.encode(r.pairs) for r in requests)])
    tok.close()

    rates: dict[str, list[float]] = {name: [] for name in runs}
    fidelity: dict[str, float] = {}
    with progress_bar(console) as progress:
        task = progress.add_task("rounds", total=(rounds + 1) * len(runs))
        # Round 0 is untimed: every path sees every batch shape once first (OpenVINO and ORT compile
        # kernels per new shape; a server pays that once, not per request).
        for round_ in range(rounds + 1):
            for name, (path, calls, at_once) in runs.items():
                t0 = time.perf_counter()
                got = run_calls(path, every, calls, at_once)
                if round_:
                    rates[name].append(len(got) / (time.perf_counter() - t0))
                    fidelity[name] = float(spearmanr(got, ref).statistic)
                progress.advance(task)
    # each xbench path's planner, with its alignment probe where it computes on padding
    cost_models = {name: pipe.describe()["batch_cost_model"] for name, pipe in pipelines.items()}
    for pipe in pipelines.values():
        pipe.close()
    shutil.rmtree(work, ignore_errors=True)

    base = statistics.fmean(rates["sentence-transformers fp32"])
    table = Table(title=f"Peers on {lengths} pairs ({pairs}, requests of {batch}, {threads} threads, {rounds} interleaved "
                        "rounds); × sentence-transformers fp32")
    for col in ("path", "computed", "pairs/s per round", "mean", "× sentence-transformers", "Spearman vs fp32"):
        table.add_column(col, justify="left" if col in ("path", "computed") else "right")
    rows = {}
    for name, values in rates.items():
        mean = statistics.fmean(values)
        rows[name] = {"pairs_per_s": values, "mean": mean, "ratio": mean / base, "spearman": fidelity[name],
                      "computed": runs[name][0].computed,
                      "calls": "request" if name == name.split(" + ")[0] else "sorted"}
        table.add_row(name, rows[name]["computed"], " ".join(f"{x:.1f}" for x in values), f"{mean:.1f}",
                      f"{mean / base:.2f}", f"{fidelity[name]:.4f}")
    for name, why in missing.items():
        table.add_row(name, "", why, "", "", "")
    console.print(table)
    verdicts = compare(rows)
    for line in verdicts:
        console.print(line)
    write_json(out, {"env": environment(), "pairs": pairs, "batch": batch, "rounds": rounds, "lengths": lengths,
                     "threads": threads, "rows": rows, "missing": missing, "verdicts": verdicts,
                     "cost_models": cost_models})
    console.print(f"wrote {out}")


def compare(rows: dict[str, dict]) -> list[str]:
    """The head-to-head ratios a reader looks for, each against the fastest fitting peer."""
    lines = []
    peers = {k: v for k, v in rows.items() if not k.startswith("xbench")}
    mine = {k: v for k, v in rows.items() if k.startswith("xbench")}

    def fastest(group: dict[str, dict], keep: Callable[[str, dict], bool]) -> str | None:
        return max((k for k, v in group.items() if keep(k, v)), key=lambda k: group[k]["mean"], default=None)

    def line(what: str, ours: str | None, theirs: str | None) -> None:
        if ours and theirs:
            lines.append(f"{what}: {ours} ({mine[ours]['mean']:.1f}) = {mine[ours]['mean'] / peers[theirs]['mean']:.2f}x "
                         f"{theirs} ({peers[theirs]['mean']:.1f})")

    accurate = lambda k, v: v["spearman"] >= 0.95  # noqa: E731
    line("best xbench path (Spearman >= 0.95) vs the fastest peer, one call per request",
         fastest(mine, lambda k, v: accurate(k, v) and v["calls"] == "request"),
         fastest(peers, lambda k, v: accurate(k, v) and v["calls"] == "request"))
    line("with every request at once vs the fastest peer given sorted batches across requests",
         fastest(mine, lambda k, v: accurate(k, v) and v["calls"] == "sorted"),
         fastest(peers, lambda k, v: accurate(k, v) and v["calls"] == "sorted"))
    int8 = fastest(mine, lambda k, v: "int8" in k and v["spearman"] >= 0.99 and v["calls"] == "request")
    lines.append(f"fastest xbench int8 path at Spearman >= 0.99: {int8 or 'none'}"
                 + (f" ({mine[int8]['spearman']:.4f})" if int8 else ""))
    fp32 = lambda k, v: v["computed"] == "fp32"  # noqa: E731
    line("best true-fp32 xbench path vs the fastest true-fp32 peer", fastest(mine, lambda k, v: fp32(k, v) and v["calls"] == "request"),
         fastest(peers, lambda k, v: fp32(k, v) and v["calls"] == "request"))
    line("xbench bf16 vs OpenVINO bf16", fastest(mine, lambda k, v: v["computed"] == "bf16" and v["calls"] == "request"),
         "OpenVINO bf16" if "OpenVINO bf16" in peers else None)
    for precision in ("fp32", "bf16", "int8"):
        line(f"xbench openvino {precision} vs OpenVINO alone", f"xbench openvino {precision}" if
             f"xbench openvino {precision}" in mine else None,
             f"OpenVINO {precision}" if f"OpenVINO {precision}" in peers else None)
    return lines


if __name__ == "__main__":
    typer.run(main)
