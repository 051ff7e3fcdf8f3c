"""Benchmark: xbench against what a user would pick instead, on the same pairs, in one run.

Every path scores the same requests (one query with `batch` documents, from strings, one call
per request, tokenization included) on the same local model folder, offline:

  sentence-transformers  CrossEncoder.predict (fp32), the baseline (= 1.00)
  optimum                ORTModelForSequenceClassification, fp32 and dynamic int8 (avx2 config)
  fastembed              TextCrossEncoder on the int8 ONNX file, from a local folder
  flashrank              Ranker on the int8 ONNX file, from a local folder
  CTranslate2            Encoder (float32 and int8) + the checkpoint's head, as its docs show
  xbench                 the pipeline (Pipeline.submit per request) on its own backends

Rounds are interleaved, so drift hits every path alike. Fidelity: Spearman of each path's
scores against transformers fp32 over every pair. Needs `pip install 'xbench[peers]'` (a peer
that is not installed is reported as such, never silently dropped).

    python benchmarks/peers.py [--pairs 256] [--rounds 2] [--lengths longtail] [--only 'A,B']
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from xbench.backends.torch_backend import TorchBackend
from xbench.bench.runners import progress_bar
from xbench.config import compose_config
from xbench.core.batcher import collate
from xbench.core.pipeline import Pipeline
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.models import resolve_model
from xbench.results.store import environment, write_json
from xbench.workload import Request, synthetic

console = Console(width=150)
Scorer = Callable[[Request], np.ndarray]  # one request's scores (any monotone scale)


def sentence_transformers(model_dir: Path, threads: int) -> Scorer:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(model_dir), device="cpu")
    return lambda r: np.asarray(model.predict(r.pairs, batch_size=len(r.pairs), show_progress_bar=False))


def optimum(model_dir: Path, threads: int, work: Path, int8: bool) -> Scorer:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import AutoTokenizer

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    out = work / "optimum-fp32"
    if not out.is_dir():
        ORTModelForSequenceClassification.from_pretrained(str(model_dir), export=True).save_pretrained(out)
    path = out
    if int8:
        path = work / "optimum-int8"
        if not path.is_dir():
            ORTQuantizer.from_pretrained(out).quantize(AutoQuantizationConfig.avx2(is_static=False, per_channel=True),
                                                       save_dir=path)
    model = ORTModelForSequenceClassification.from_pretrained(path, session_options=opts)
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def score(r: Request) -> np.ndarray:
        enc = tok([q for q, _ in r.pairs], [d for _, d in r.pairs], padding=True, truncation=True,
                  max_length=512, return_tensors="pt")
        return model(**enc).logits[:, 0].detach().numpy()

    return score


def int8_onnx_folder(model_dir: Path, work: Path, file_name: str) -> Path:
    """optimum's int8 ONNX file with the tokenizer files, laid out as fastembed/flashrank read them."""
    optimum(model_dir, 1, work, int8=True)  # builds the file once
    folder = work / file_name.replace("/", "_")
    (folder / Path(file_name).parent).mkdir(parents=True, exist_ok=True)
    shutil.copy(next((work / "optimum-int8").glob("*.onnx")), folder / file_name)
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
    return lambda r: np.fromiter(model.rerank(r.query, list(r.documents), batch_size=len(r.documents)), dtype=np.float32)


def flashrank(model_dir: Path, threads: int, work: Path) -> Scorer:
    from flashrank import Ranker, RerankRequest

    name = "ms-marco-MiniLM-L-12-v2"  # a name flashrank knows; its file is our int8 graph
    folder = int8_onnx_folder(model_dir, work, "flashrank-MiniLM-L-12-v2_Q.onnx")
    cache = work / "flashrank"
    shutil.rmtree(cache / name, ignore_errors=True)
    shutil.copytree(folder, cache / name)
    ranker = Ranker(model_name=name, cache_dir=str(cache), max_length=512, log_level="WARNING")

    def score(r: Request) -> np.ndarray:
        out = ranker.rerank(RerankRequest(query=r.query, passages=[{"id": i, "text": d} for i, d in enumerate(r.documents)]))
        scores = np.empty(len(out), dtype=np.float32)
        for x in out:
            scores[x["id"]] = x["score"]
        return scores

    return score


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

    def score(r: Request) -> np.ndarray:
        enc = tok.encode_batch(r.pairs)
        out = encoder.forward_batch([e.ids for e in enc], token_type_ids=[e.type_ids for e in enc])
        return head(np.asarray(out.pooler_output))[:, 0]

    return score


def xbench(overrides: list[str]) -> tuple[Scorer, Pipeline]:
    pipe = Pipeline.from_config(compose_config(overrides)).start()
    return (lambda r: pipe.submit(r.pairs).result().logits), pipe


def main(
    pairs: int = typer.Option(256, help="Pairs scored by every path in every round."),
    batch: int = typer.Option(32, help="Documents per request (one call each)."),
    rounds: int = typer.Option(2, help="Interleaved rounds."),
    lengths: str = typer.Option("longtail", help="Length mix of the synthetic pairs: longtail, msmarco or fixed."),
    threads: int = typer.Option(2, help="Intra-op threads for every path."),
    only: str = typer.Option("", help="Comma-separated paths to run (sentence-transformers fp32, the baseline, "
                                      "always runs), e.g. 'CTranslate2 float32,xbench pytorch fp32'."),
    out: Path = typer.Option(Path("results/benchmarks/peers.json"), "--out", "-o"),
) -> None:
    model_dir = resolve_model("default").path
    workload = synthetic(pairs, seed=11, docs_per_query=batch, lengths=lengths)
    requests = [workload.request(i, batch) for i in range(pairs // batch)]
    work = Path(tempfile.mkdtemp(prefix="xbench-peers-"))
    builders: dict[str, Callable[[], Scorer]] = {
        "sentence-transformers fp32": lambda: sentence_transformers(model_dir, threads),
        "optimum (ORT) fp32": lambda: optimum(model_dir, threads, work, int8=False),
        "optimum (ORT) int8": lambda: optimum(model_dir, threads, work, int8=True),
        "fastembed int8": lambda: fastembed(model_dir, threads, work),
        "flashrank int8": lambda: flashrank(model_dir, threads, work),
        "CTranslate2 float32": lambda: ctranslate2(model_dir, threads, "float32"),
        "CTranslate2 int8": lambda: ctranslate2(model_dir, threads, "int8_float32"),
    }
    ours = {
        "xbench pytorch fp32": [],
        "xbench pytorch int8": ["model_pool.instances.0.quantization=int8"],
        "xbench onnx fp32": ["model_pool.instances.0.backend=onnx"],
        "xbench onnx int8": ["model_pool.instances.0.backend=onnx", "model_pool.instances.0.quantization=int8"],
        "xbench ctranslate2 int8": ["model_pool.instances.0.backend=ctranslate2", "model_pool.instances.0.quantization=int8"],
    }
    if only:
        wanted = {name.strip() for name in only.split(",")} | {"sentence-transformers fp32"}
        if unknown := wanted - builders.keys() - ours.keys():
            raise typer.BadParameter(f"no such path: {', '.join(sorted(unknown))}; paths: "
                                     f"{', '.join([*builders, *ours])}", param_hint="--only")
        builders = {k: v for k, v in builders.items() if k in wanted}
        ours = {k: v for k, v in ours.items() if k in wanted}
    scorers: dict[str, Scorer] = {}
    pipelines = []
    missing = {}
    with console.status("loading every path (conversions and exports run once) ..."):
        for name, build in builders.items():
            try:
                scorers[name] = build()
            except ImportError as exc:
                missing[name] = f"not installed ({exc.name}): pip install 'xbench[peers]'"
        for name, ov in ours.items():
            scorers[name], pipe = xbench([*ov, f"model_pool.threads_per_worker={threads}"])
            pipelines.append(pipe)
    # The reference: transformers fp32, padded, on the same pairs.
    tok = TokenizerPool(load_tokenizer(model_dir, 512))
    reference = TorchBackend(str(model_dir), "cpu", "fp32", threads, packed=False)
    ref = np.concatenate([reference.forward(*collate(enc.ids, enc.type_ids))
                          for enc in (tok.encode(r.pairs) for r in requests)])
    tok.close()

    rates: dict[str, list[float]] = {name: [] for name in scorers}
    fidelity: dict[str, float] = {}
    with progress_bar(console) as progress:
        task = progress.add_task("rounds", total=rounds * len(scorers))
        for _ in range(rounds):
            for name, score in scorers.items():
                score(requests[0])  # warm
                t0 = time.perf_counter()
                got = np.concatenate([np.asarray(score(r), dtype=np.float64).reshape(-1) for r in requests])
                rates[name].append(len(got) / (time.perf_counter() - t0))
                fidelity[name] = float(spearmanr(got, ref).statistic)
                progress.advance(task)
    for pipe in pipelines:
        pipe.close()
    shutil.rmtree(work, ignore_errors=True)

    base = statistics.fmean(rates["sentence-transformers fp32"])
    table = Table(title=f"Peers on {lengths} pairs ({pairs}, requests of {batch}, {threads} threads, {rounds} interleaved "
                        "rounds); × sentence-transformers fp32")
    for col in ("path", "pairs/s per round", "mean", "× sentence-transformers", "Spearman vs fp32"):
        table.add_column(col, justify="left" if col == "path" else "right")
    rows = {}
    for name, values in rates.items():
        mean = statistics.fmean(values)
        rows[name] = {"pairs_per_s": values, "mean": mean, "ratio": mean / base, "spearman": fidelity[name]}
        table.add_row(name, " ".join(f"{x:.1f}" for x in values), f"{mean:.1f}", f"{mean / base:.2f}", f"{fidelity[name]:.4f}")
    for name, why in missing.items():
        table.add_row(name, why, "", "", "")
    console.print(table)
    peers = {k: v for k, v in rows.items() if not k.startswith("xbench")}
    mine = {k: v for k, v in rows.items() if k.startswith("xbench")}
    if peers and mine:
        fastest_peer = max(peers, key=lambda k: peers[k]["mean"])
        best = max((k for k in mine if mine[k]["spearman"] >= 0.95), key=lambda k: mine[k]["mean"], default=None)
        if best:
            console.print(f"best xbench path at Spearman >= 0.95: {best} = "
                          f"{mine[best]['mean'] / peers[fastest_peer]['mean']:.2f}x the fastest peer ({fastest_peer})")
        fp32 = max((k for k in mine if "fp32" in k), key=lambda k: mine[k]["mean"], default=None)
        if "CTranslate2 float32" in peers and fp32:
            console.print(f"best xbench fp32 path: {fp32} = {mine[fp32]['mean'] / peers['CTranslate2 float32']['mean']:.2f}x "
                          "CTranslate2 float32")
    write_json(out, {"env": environment(), "pairs": pairs, "batch": batch, "rounds": rounds, "lengths": lengths,
                     "threads": threads, "rows": rows, "missing": missing})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
