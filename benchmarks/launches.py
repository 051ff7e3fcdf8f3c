"""Benchmark: the operators one packed PyTorch forward runs on the CUDA code path, counted on the CPU.

A 6-layer encoder at fp16 finishes its kernels on a Hopper GPU faster than Python launches them,
so the eager forward's rate follows the host's time per launched operator (and it holds the GIL
the rest of the pipeline needs meanwhile). This runs the CUDA path's code on the CPU (flash
attention's variable-length call stubbed by a copy of its queries; the attention kernel itself
is one launch either way) over one batch of the workload, under torch's profiler, and counts the
top-level operators: all of them, those that are not views (each of these launches at least
one kernel on a GPU), and the host-device syncs among them (the host waits for the GPU to catch
up; the copy of the scores back at the end is not counted). It also times the same path on a
6-layer BERT of hidden size 32, whose compute is negligible: mostly the host's cost of a forward.
`--against REV` measures a git revision too, each measurement in a fresh interpreter, in
alternating rounds.

    python benchmarks/launches.py [--rows 128] [--lengths msmarco] [--against HEAD~1] [--rounds 3]
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
VIEWS = {"aten::slice", "aten::select", "aten::view", "aten::reshape", "aten::unsqueeze", "aten::transpose",
         "aten::unbind", "aten::as_strided", "aten::expand", "aten::alias", "aten::lift_fresh", "aten::detach",
         "aten::t", "aten::permute", "aten::squeeze", "aten::_reshape_alias", "aten::resolve_conj",
         "aten::resolve_neg", "aten::dropout"}  # dropout in eval mode returns its input
SYNCS = {"aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::nonzero"}  # wait for the device


def count(rows: int, lengths: str) -> dict:
    """The counts for one batch, on whichever xbench PYTHONPATH holds."""
    import torch
    from torch.profiler import profile

    import xbench.backends.packed as packed
    import xbench.backends.torch_backend as torch_backend
    from xbench.core import batcher
    from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
    from xbench.workload import synthetic

    try:
        from xbench.checkpoints import resolve_model
    except ImportError:  # a revision from before the module had this name
        from xbench.models import resolve_model

    # The CUDA code path, on the CPU: flash attention's variable-length call becomes one copy.
    packed.flash_varlen_available = torch_backend.flash_varlen_available = lambda device, dtype: True
    packed.varlen_attention = lambda q, k, v, cu_q, cu_k, max_q, max_k: q.clone()
    model = resolve_model("default").path
    tokenizers = TokenizerPool(load_tokenizer(model, 512))
    enc = tokenizers.encode(synthetic(rows, seed=0, lengths=lengths).pairs(rows))
    tokenizers.close()
    backend = torch_backend.TorchBackend(str(model), "cpu", "fp32", threads=1, packed=True)
    pad = getattr(batcher, "pad", None) or __import__("xbench.layout", fromlist=["pad"]).pad

    def forward() -> None:  # from the batch as the batcher holds it (flat) to host scores
        if hasattr(backend, "forward_packed"):
            backend.forward_packed(enc.flat_ids, enc.flat_types, enc.lengths)
        else:  # revisions that padded in the batcher and took padded batches
            backend.forward(*pad(enc.flat_ids, enc.flat_types, enc.lengths))

    forward()
    with torch.inference_mode(), profile() as prof:
        forward()
    top = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    launching = collections.Counter(name for name in top if name not in VIEWS)
    syncs = sum(1 for name in top if name in SYNCS)  # besides the copy of the scores back, which ends the batch
    return {"operators": len(top), "launching": sum(launching.values()), "syncs": syncs,
            "host_us": host_time(torch_backend, pad), "by_operator": dict(launching.most_common())}


def host_time(torch_backend, pad) -> float:
    """Microseconds of one forward of a 6-layer BERT of hidden size 32 on 2 pairs, on the same
    code path: its compute is negligible, so this is mostly the host's cost per operator (best
    of 5 x 200 forwards, one thread)."""
    import time

    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64, num_labels=1)
    with tempfile.TemporaryDirectory() as folder:
        BertForSequenceClassification(config).eval().save_pretrained(folder)
        backend = torch_backend.TorchBackend(folder, "cpu", "fp32", threads=1, packed=True)
    lengths = np.array([8, 6])
    ids, types = np.full(14, 1000, np.int32), np.zeros(14, np.int32)

    def forward() -> None:
        if hasattr(backend, "forward_packed"):
            backend.forward_packed(ids, types, lengths)
        else:
            backend.forward(*pad(ids, types, lengths))

    for _ in range(50):
        forward()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            forward()
        best = min(best, (time.perf_counter() - start) / 200)
    return best * 1e6


def run_child(tree: Path, rows: int, lengths: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, __file__, "--child", str(rows), lengths], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"counting failed in {tree}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(
    rows: int = typer.Option(128, help="Pairs in the batch."),
    lengths: str = typer.Option("msmarco", help="Workload length mix: msmarco | longtail | fixed."),
    against: Optional[str] = typer.Option(None, help="A git revision counted alongside this checkout."),
    rounds: int = typer.Option(3, help="Rounds of the host timing; each times every revision once."),
    out: Path = typer.Option(Path("results/benchmarks/launches.json"), "--out", "-o"),
    child: bool = typer.Option(False, "--child", hidden=True),
    child_args: Optional[list[str]] = typer.Argument(None, hidden=True),
) -> None:
    if child:
        n, mix = child_args or []
        print(json.dumps(count(int(n), mix)))
        return
    trees = {"this checkout": ROOT}
    worktree = None
    if against:
        worktree = Path(tempfile.mkdtemp(prefix="xbench-against-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(worktree), against],
                       check=True, capture_output=True)
        trees = {against: worktree, **trees}
    try:
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, tree in trees.items():
                runs[name].append(run_child(tree, rows, lengths))
    finally:
        if worktree:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    table = Table(title=f"One packed forward of the default model on the CUDA code path (counted on the CPU), "
                        f"{rows} {lengths} pairs")
    for col in ("code", "operators", "launching (not views)", "host-device syncs", "host µs a forward, tiny model, per round",
                "launching, by operator"):
        table.add_column(col)
    for name, measured in runs.items():
        c = measured[0]  # the counts do not change from round to round
        table.add_row(name, str(c["operators"]), str(c["launching"]), str(c["syncs"]),
                      " ".join(f"{m['host_us']:.0f}" for m in measured),
                      ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in c["by_operator"].items()))
    console = Console(width=160)
    console.print(table)
    from xbench.results.store import environment, write_json

    write_json(out, {"env": environment(), "rows": rows, "lengths": lengths, "against": against, "runs": runs})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
