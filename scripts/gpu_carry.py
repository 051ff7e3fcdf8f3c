"""What a GPU run needs that the device machine lacks, made here and carried there.

The device image has PyTorch, transformers and tokenizers but no package index, none of
xbench's own dependencies below, and no embedded default model; a call carries at most 64 MiB.
So the default model travels with fp16 weights (about 45 MB, restored to fp32 there) and the
missing packages as wheels for the image's Python 3.12, at the versions installed here.

    python scripts/gpu_carry.py prepare                 # here: .gpu/ and .whl/ (both git-ignored)
    python3 scripts/gpu_carry.py restore /tmp/model     # there: the model folder, fp32 again

A device call then carries [".gpu", ".whl"]; the padding benchmark, for instance, is this command:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 scripts/gpu_carry.py restore \
      /tmp/model && set -o pipefail && GPU_MODEL=/tmp/model GPU_PATHS="pytorch:fp16 pytorch:fp16:thread" \
      GPU_FIDELITY_PATHS=pytorch:fp16 scripts/gpu_check.sh -d 6 --warmup 3 2>&1 | tee $OUT/log; cp -r results/gpu $OUT/
(the repository on PYTHONPATH: scripts/gpu_check.py imports xbench from the checkout).
Rehearsed on the CPU with the image's stack (Python 3.12, torch 2.11.0+cu130, transformers 5.17.0,
tokenizers 0.23.2, none of the packages above): this install and restore, `gpu_check.py --device
cpu`, and pipeline-bench with the model process and without it all ran.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL, WHEELS = ROOT / ".gpu" / "model", ROOT / ".whl"
FP16_WEIGHTS = "model.fp16.safetensors"
# xbench's dependencies (and theirs) that the device image lacks (device/KINDS.md's package list)
MISSING = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "starlette", "uvicorn", "pydantic", "pydantic-core",
           "annotated-types", "typing-inspection")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 17)] + ["manylinux2014_x86_64"]


def pack_model(source: Path, dest: Path) -> None:
    """`source`'s model folder with its float weights at fp16 (half the bytes)."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dest / f.name)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, dest / FP16_WEIGHTS)


def restore(target: Path, source: Path = MODEL) -> None:
    """A model folder loadable as it was, its fp16 weights widened back to fp32."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name != FP16_WEIGHTS:
            shutil.copy2(f, target / f.name)
    weights = load_file(source / FP16_WEIGHTS)
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, target / "model.safetensors")


def download_wheels(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    for name in MISSING:
        spec = f"{name}=={metadata.version(name)}"
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", "3.12", "--implementation", "cp",
                              *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), spec],
                             capture_output=True, text=True)
        if got.returncode != 0:  # a source-only package (antlr4's runtime): pure Python, so build its wheel here
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec], check=True)


def prepare() -> None:
    from xbench.checkpoints import resolve_model

    pack_model(Path(resolve_model("xbench/minilm-l6-seeded").path), MODEL)
    download_wheels(WHEELS)
    size = sum(f.stat().st_size for d in (MODEL, WHEELS) for f in d.rglob("*") if f.is_file())
    print(f"{MODEL.relative_to(ROOT)} and {WHEELS.relative_to(ROOT)}: {size / 2**20:.1f} MiB "
          "(a device call carries at most 64 MiB with the working tree)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("prepare", help="here: .gpu/model (fp16 weights) and .whl (wheels the image lacks)")
    sub.add_parser("restore", help="there: the model folder with fp32 weights").add_argument("target", type=Path)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare()
    else:
        restore(args.target)
        print(f"{args.target}: the default model, fp16 weights restored to fp32")
