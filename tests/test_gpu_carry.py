"""scripts/gpu_carry.py: a model carried to a GPU at fp16 comes back loadable, scoring as before."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from xbench.backends.torch_backend import TorchBackend
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.workload import synthetic

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_carry.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_carry", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scores(model: Path) -> np.ndarray:
    tok = TokenizerPool(load_tokenizer(model, 512))
    enc = tok.encode(synthetic(64, seed=0, lengths="longtail").pairs(32))
    tok.close()
    return np.asarray(TorchBackend(str(model), "cpu", "fp32", 1).forward_packed(enc.flat_ids, enc.flat_types, enc.lengths))


def test_a_model_packed_at_fp16_restores_to_a_folder_that_scores_as_the_original(tiny_model, tmp_path):
    carry = _load_script()
    packed, restored = tmp_path / "carried", tmp_path / "restored"
    carry.pack_model(tiny_model, packed)
    weights = packed / carry.FP16_WEIGHTS
    assert not (packed / "model.safetensors").exists()
    assert weights.stat().st_size < 0.6 * (tiny_model / "model.safetensors").stat().st_size  # half the bytes, + header
    carry.restore(restored, source=packed)
    assert {f.name for f in restored.iterdir()} == {f.name for f in tiny_model.iterdir()}
    original, back = _scores(tiny_model), _scores(restored)
    assert np.abs(original - back).max() < 1e-2 * max(1.0, float(np.abs(original).max()))  # fp16 rounding only
