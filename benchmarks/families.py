"""Benchmark: a reranker family through xbench against what a user runs instead, same pairs.

--family qwen3 (an LLM reranker against the plain transformers recipe and sentence-transformers'
CrossEncoder) or modernbert (the ModernBERT-base stand-in against sentence-transformers'
CrossEncoder on the same folder). Every peer gets the threads xbench's model worker uses and its
input sorted by length.

On the Qwen3-Reranker-0.6B stand-in (`xbench/qwen3-reranker-0.6b-seeded`; or --model for any
folder with a label-logits recipe), for each workload (MS MARCO-shaped and long-tailed), rounds
alternating, each path scoring the same pairs from strings (tokenizing included):

  reference   the model card's recipe: AutoModelForCausalLM, the prompt as one string between the
              prefix and suffix tokens, padded batches of --batch sorted by length, the full LM head
              at the last position only (`logits_to_keep=1`: the model card's snippet computes
              every position's vocabulary, several GB a batch, which no careful user keeps),
              logit("yes") - logit("no")
  sentence-transformers  CrossEncoder on the same folder, the recipe's prompt as its chat template
  xbench      the pipeline of the default config (`Pipeline.submit`, requests of --batch documents),
              fp32 (packed, the shared prefix run once), fp32 with the shared prefix off and fp32
              padded (`packed=false`): each one's gain on its own; and at --precision

On ModernBERT, where OpenVINO is installed, xbench's openvino backend runs beside PyTorch (fp32 and
--precision).

Every row reports pairs/s, its ratio to the reference in the same round, and Spearman's rho of its
scores against the reference's.

    python benchmarks/families.py [--pairs 64] [--batch 32] [--rounds 2] [--precision bf16]
    python benchmarks/families.py --device cuda --reference-precision fp16 --precision bf16   # on a GPU
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from xbench.backends import REGISTRY
from xbench.config import compose_config
from xbench.core.model_pool import default_workers, threads_per_worker
from xbench.core.pipeline import Pipeline
from xbench.errors import missing_modules
from xbench.checkpoints import resolve_instance
from xbench.recipes import QWEN3
from xbench.results.store import environment, write_json
from xbench.standins import MODERNBERT_STANDIN, QWEN3_STANDIN
from xbench.workload import make_workload

console = Console(width=150)


class Reference:
    """The recipe as Qwen3-Reranker's model card writes it."""

    def __init__(self, model_dir: Path, max_length: int, batch: int, device: str = "cpu", precision: str = "fp32"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.device = torch.device(device)
        self.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
        self.lm.to(self.device)
        self.prefix = self.tok.encode(QWEN3.head[0], add_special_tokens=False)
        self.suffix = self.tok.encode(QWEN3.tail[0], add_special_tokens=False)
        self.no, self.yes = self.tok.convert_tokens_to_ids("no"), self.tok.convert_tokens_to_ids("yes")
        self.max_length, self.batch = max_length, batch

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        texts = [f"<Instruct>: {QWEN3.instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
        enc = self.tok(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=self.max_length - len(self.prefix) - len(self.suffix))
        ids = [self.prefix + e + self.suffix for e in enc["input_ids"]]
        order = np.argsort([len(i) for i in ids], kind="stable")  # sorted by length: the fair chance
        out = np.empty(len(ids), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(ids), self.batch):
                rows = order[start:start + self.batch]
                batch = self.tok.pad({"input_ids": [ids[r] for r in rows]}, padding=True, return_tensors="pt")
                logits = self.lm(**batch.to(self.device), logits_to_keep=1).logits[:, -1, :]
                out[rows] = (logits[:, self.yes] - logits[:, self.no]).float().cpu().numpy()
        return out


class SentenceTransformersCrossEncoder:
    """sentence-transformers' CrossEncoder on the model folder: raw logits, batches of --batch over
    the pairs sorted by length (the fair chance xbench's batcher gets), in the caller's order. A
    causal LM loads as sentence-transformers loads one (AutoModelForCausalLM, left padding, the
    last position's logits only, logit("yes") - logit("no")), its prompt from a chat template with
    `query` and `document` roles: the one published Qwen3-Reranker checkpoints carry, written here
    from the recipe into a copy of the folder (the weights linked, not copied)."""

    def __init__(self, model_dir: Path, max_length: int, batch: int, recipe=None):
        from sentence_transformers import CrossEncoder

        if recipe is not None:
            model_dir = with_chat_template(model_dir, recipe)
        self.model = CrossEncoder(str(model_dir), max_length=max_length, device="cpu")
        self.batch = batch

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        import torch.nn

        order = np.argsort([len(q) + len(d) for q, d in pairs], kind="stable")
        scores = self.model.predict([pairs[i] for i in order], batch_size=self.batch, activation_fn=torch.nn.Identity(),
                                    show_progress_bar=False)
        out = np.empty(len(pairs), dtype=np.float32)
        out[order] = np.asarray(scores, dtype=np.float32).reshape(len(pairs))
        return out


def with_chat_template(model_dir: Path, recipe) -> Path:
    """A copy of a model folder (files linked) whose tokenizer carries the recipe's prompt as a
    chat template over the roles sentence-transformers gives a pair: `query` and `document`."""
    import atexit
    import json
    import shutil
    import tempfile

    role = '{{{{ (messages | selectattr("role", "eq", "{}") | first).content }}}}'
    text = (recipe.head[0] + recipe.query.replace("{instruction}", recipe.instruction).replace("{query}", role.format("query"))
            + recipe.document.replace("{document}", role.format("document")) + recipe.tail[0])
    out = Path(tempfile.mkdtemp(prefix="xbench-st-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # links only: nothing to keep
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (out / f.name).symlink_to(f)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = text + "\n"  # Jinja drops a template's one trailing newline
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def xbench_scores(pipe: Pipeline, pairs: list[tuple[str, str]], batch: int) -> np.ndarray:
    jobs = [pipe.submit(pairs[i:i + batch]) for i in range(0, len(pairs), batch)]
    return np.concatenate([j.result(3600).logits for j in jobs])


def main(
    family: str = typer.Option("qwen3", help="qwen3 (against the transformers recipe) or modernbert (against "
                                             "sentence-transformers' CrossEncoder)."),
    model: Optional[str] = typer.Option(None, help="The model (default: the family's stand-in)."),
    pairs: int = typer.Option(64, help="Pairs per workload."),
    batch: int = typer.Option(32, help="Documents a request (xbench) and pairs a batch (reference)."),
    rounds: int = typer.Option(2),
    precision: Optional[str] = typer.Option("bf16", help="A second xbench precision (bf16 where the CPU has AMX "
                                                          "or AVX512-BF16, else int8); empty for none."),
    max_length: int = typer.Option(512),
    device: str = typer.Option("cpu", help="cpu or cuda: where both the reference and xbench run."),
    reference_precision: str = typer.Option("fp32", help="The reference's dtype (fp16 or bf16 on a GPU)."),
    out: Path = typer.Option(Path("results/benchmarks/families.json"), "--out", "-o"),
) -> None:
    if family not in ("qwen3", "modernbert"):
        raise typer.BadParameter(f"{family!r}: choose qwen3 or modernbert", param_hint="--family")
    model = model or (QWEN3_STANDIN if family == "qwen3" else MODERNBERT_STANDIN)
    base = [f"model_pool.instances.0.name={model}", f"model_pool.instances.0.max_length={max_length}",
            f"model_pool.instances.0.device={device}"]
    composed = compose_config(base)
    resolved = resolve_instance(composed.model_pool.instances[0])
    # The peers run on as many threads as xbench's model workers have in all (its default on the
    # CPU: one worker on every core).
    workers = composed.model_pool.workers or default_workers(device)
    torch.set_num_threads(workers * threads_per_worker(workers, composed.model_pool.threads_per_worker))
    peers = {}
    if family == "qwen3":
        reference = Reference(resolved.path, max_length, batch, device, reference_precision)
        if device == "cpu":
            peers["sentence-transformers CrossEncoder fp32 (sorted)"] = SentenceTransformersCrossEncoder(
                resolved.path, max_length, batch, QWEN3)
        paths = {"xbench fp32": base, "xbench fp32, prefix not shared": [*base, "model_pool.instances.0.shared_prefix=false"],
                 "xbench fp32, padded": [*base, "model_pool.instances.0.packed=false"]}
    else:
        reference = SentenceTransformersCrossEncoder(resolved.path, max_length, batch)
        paths = {"xbench fp32": base, "xbench fp32, padded": [*base, "model_pool.instances.0.packed=false"]}
    if precision:
        paths[f"xbench {precision}"] = [*base, f"model_pool.instances.0.quantization={precision}"]
    if family != "qwen3" and device == "cpu" and not missing_modules(REGISTRY["openvino"].requires):
        # OpenVINO converts encoder classifiers (not LLM rerankers): its precisions beside PyTorch's
        for p in ("fp32", precision) if precision else ("fp32",):
            paths[f"xbench openvino {p}"] = [*base, "model_pool.instances.0.backend=openvino",
                                             f"model_pool.instances.0.quantization={p}"]
    pipes = {}
    with console.status("loading the pipelines ..."):
        for name, overrides in paths.items():
            pipes[name] = Pipeline.from_config(compose_config(overrides)).start()
    report: dict = {"env": environment(), "model": resolved.info(), "family": family, "batch": batch, "pairs": pairs,
                    "workloads": {}}
    try:
        for lengths in ("msmarco", "longtail"):
            cfg = compose_config([*base, f"workload.lengths={lengths}"])
            workload = make_workload(None, cfg)
            query, _ = workload.pairs(1)[0]
            docs = [d for _, d in workload.pairs(pairs + 1)[1:]]
            sample = [(query, d) for d in docs]  # one query, as a reranker sees its candidates
            times: dict[str, list[float]] = {"reference": [], **{n: [] for n in peers}, **{n: [] for n in pipes}}
            scores: dict[str, np.ndarray] = {}
            for r in range(rounds):
                for name in times:
                    with console.status(f"{lengths}, round {r + 1}/{rounds}: {name} ..."):
                        t0 = time.perf_counter()
                        if name in pipes:
                            scores[name] = xbench_scores(pipes[name], sample, batch)
                        else:
                            scores[name] = (peers.get(name) or reference).score(sample)
                        times[name].append(time.perf_counter() - t0)
            rows = {}
            for name, spent in times.items():
                rate = [pairs / s for s in spent]
                ratio = [t_ref / s for t_ref, s in zip(times["reference"], spent)]
                rows[name] = {"pairs_per_s": rate, "ratio_to_reference": ratio,
                              "spearman": spearman(scores[name], scores["reference"]),
                              "max_abs_diff": float(np.abs(scores[name] - scores["reference"]).max())}
            report["workloads"][lengths] = rows
    finally:
        for p in pipes.values():
            p.close()

    against = "the transformers recipe" if family == "qwen3" else "sentence-transformers' CrossEncoder"
    table = Table(title=f"{model}: xbench against {against} (the reference row), {pairs} pairs, batch {batch}")
    for col in ("workload", "path", "pairs/s per round", "× reference (per round)", "Spearman vs reference",
                "max |Δ score|"):
        table.add_column(col, justify="left" if col in ("workload", "path") else "right")
    for lengths, rows in report["workloads"].items():
        for name, row in rows.items():
            table.add_row(lengths, name, " ".join(f"{v:.2f}" for v in row["pairs_per_s"]),
                          " ".join(f"{v:.2f}" for v in row["ratio_to_reference"]) + f" (mean {statistics.fmean(row['ratio_to_reference']):.2f})",
                          f"{row['spearman']:.4f}", f"{row['max_abs_diff']:.1e}")
    console.print(table)
    write_json(out, report)
    console.print(f"[dim]raw: {out}[/]")


if __name__ == "__main__":
    typer.run(main)
