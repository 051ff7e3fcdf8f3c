"""Every backend computes the same model: scores against the PyTorch fp32 reference on the same
weights and the same default-workload pairs."""

import shutil

import numpy as np
import pytest
from scipy.stats import spearmanr

from xbench.backends import PRECISIONS, REGISTRY, available_devices, create_backend
from xbench.env import native_flags
from xbench.config import ModelInstanceConfig, compose_config
from xbench.bench.batches import padded_batches
from xbench.core.tokenizer_pool import TokenizerPool, load_tokenizer
from xbench.errors import BackendUnavailable, ConfigError
from xbench.checkpoints import resolve_model
from xbench.workload import synthetic

from conftest import write_tiny_bert, write_tiny_model

# (backend, precision, bar): ("abs", tol) = max |logit diff|; ("rho", r) = Spearman >= r
FIDELITY = [
    ("compiled", "fp32", ("abs", 1e-4)),
    ("onnx", "fp32", ("abs", 1e-4)),
    ("mlx", "fp32", ("abs", 1e-4)),
    ("pytorch", "fp16", ("rho", 0.99)),
    ("pytorch", "bf16", ("rho", 0.99)),
    ("compiled", "bf16", ("rho", 0.99)),
    ("mlx", "bf16", ("rho", 0.99)),
    ("pytorch", "int8", ("rho", 0.95)),
    ("pytorch", "int4", ("rho", 0.0)),
    ("onnx", "int8", ("rho", 0.95)),
    ("mlx", "int8", ("rho", 0.95)),
    ("onnx", "int4", ("rho", 0.0)),  # no bar yet: must run and correlate positively
    ("mlx", "int4", ("rho", 0.0)),
    ("ctranslate2", "fp32", ("abs", 1e-4)),
    ("ctranslate2", "int8", ("rho", 0.95)),
    ("openvino", "fp32", ("abs", 1e-4)),
    ("openvino", "bf16", ("rho", 0.99)),
    ("openvino", "int8", ("rho", 0.99)),
]


def batches_for(model_dir, n, batch=32):
    tok = TokenizerPool(load_tokenizer(model_dir, 512))
    enc = tok.encode(synthetic(4096, seed=0).pairs(n))
    tok.close()
    return padded_batches(enc, batch)


def scores(model_dir, backend, precision, batches, n, packed=None):
    """Scores of every pair; the reference is transformers' own padded forward (packed=False)."""
    inst = ModelInstanceConfig(backend=backend, quantization=precision, packed=packed)
    b = create_backend(inst, str(model_dir), threads=2)
    out = np.empty(n, dtype=np.float32)
    for idx, arrays in batches:
        out[idx] = b.forward(*arrays)
    return out


def check(got, ref, bar, label):
    kind, value = bar
    if kind == "abs":
        diff = float(np.abs(got - ref).max())
        assert diff <= value, f"{label}: max |diff| {diff:.2e} > {value}"
    else:
        rho = float(spearmanr(got, ref).statistic)
        assert rho >= value and rho > 0, f"{label}: Spearman {rho:.4f} < {value}"


@pytest.fixture(scope="module")
def tiny_setup(tiny_model):
    batches = batches_for(tiny_model, 256)
    return tiny_model, batches, scores(tiny_model, "pytorch", "fp32", batches, 256, packed=False)


# A random tiny BERT has none of a trained model's structure, and dynamic int8 with per-tensor
# activation scales suffers on its wide activation ranges (ONNX int8 reaches ~0.84 there, 0.98
# on the real encoder): on it int8 must run and keep the ranking broadly (>= 0.8); the 0.95 bar
# is held on the default model below.
TINY_INT8_BAR = ("rho", 0.8)


@pytest.mark.parametrize("backend,precision,bar", FIDELITY, ids=[f"{b}-{p}" for b, p, _ in FIDELITY])
def test_tiny_bert_matches_the_fp32_reference(tiny_setup, backend, precision, bar):
    model_dir, batches, ref = tiny_setup
    if precision == "int8":
        bar = TINY_INT8_BAR
    check(scores(model_dir, backend, precision, batches, 256), ref, bar, f"{backend} {precision}")


@pytest.fixture(scope="module")
def default_setup():
    model_dir = resolve_model("xbench/minilm-l6-seeded").path
    batches = batches_for(model_dir, 256)
    return model_dir, batches, scores(model_dir, "pytorch", "fp32", batches, 256, packed=False)


# The full-size model on 256 pairs. bf16/fp16 are left to the GPU check: CPUs without
# AVX-512 BF16 (like CI's) emulate them at a tenth of fp32 speed. MLX on Linux runs on a
# slow CPU path: it is checked on a 16-pair slice.
# Where the CPU has BF16 instructions the bf16 paths of PyTorch and OpenVINO run at speed and are
# held to their bar on the full model as well.
DEFAULT_FIDELITY = [f for f in FIDELITY if f[1] in ("fp32", "int8", "int4")
                    or (f[1] == "bf16" and f[0] in ("pytorch", "openvino") and native_flags("bf16"))]


@pytest.mark.slow
@pytest.mark.parametrize("backend,precision,bar", DEFAULT_FIDELITY, ids=[f"{b}-{p}" for b, p, _ in DEFAULT_FIDELITY])
def test_default_model_matches_the_fp32_reference(default_setup, backend, precision, bar):
    model_dir, batches, ref = default_setup
    if backend == "mlx":  # slow CPU path on Linux (about 1 s a pair): 16 pairs of the first batch
        (idx, arrays), = batches[:1]
        batches = [(idx[:16], tuple(a[:16] for a in arrays))]
    idx = np.concatenate([i for i, _ in batches])
    got = scores(model_dir, backend, precision, batches, 256)
    check(got[idx], ref[idx], bar, f"{backend} {precision}")


@pytest.mark.parametrize("override,fragment", [
    (["model_pool.instances.0.backend=mlx", "model_pool.instances.0.device=cuda"], "runs on cpu, mps"),
    (["model_pool.instances.0.backend=compiled", "model_pool.instances.0.quantization=int4"], "supports fp32, bf16, fp16"),
    (["model_pool.instances.0.backend=onnx", "model_pool.instances.0.quantization=fp16"], "fp16 only on cuda"),
    (["model_pool.instances.0.backend=pytorch", "model_pool.instances.0.device=mps",
      "model_pool.instances.0.quantization=int4"], "runs int4 only on cpu"),
    (["model_pool.instances.0.backend=compiled", "model_pool.instances.0.quantization=int8"], "supports fp32, bf16, fp16"),
])
def test_unsupported_combinations_fail_at_config_time(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        compose_config(override)


def test_corrupt_cached_onnx_is_rebuilt(tiny_model, tmp_path, monkeypatch):
    from xbench.backends.onnx_backend import ensure_onnx

    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path))
    path = ensure_onnx(tiny_model, "fp32")
    good = path.stat().st_size
    path.write_bytes(b"not an onnx file")
    assert ensure_onnx(tiny_model, "fp32") == path
    assert path.stat().st_size == good


def test_onnx_cache_is_keyed_by_weights_not_by_folder(tiny_model, tmp_path, monkeypatch):
    from xbench.backends.onnx_backend import onnx_path

    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path))
    copy = shutil.copytree(tiny_model, tmp_path / "elsewhere" / tiny_model.name)
    assert onnx_path(copy, "fp32") == onnx_path(tiny_model, "fp32")
    other = write_tiny_bert(tmp_path / "other" / tiny_model.name, seed=1)
    assert onnx_path(other, "fp32") != onnx_path(tiny_model, "fp32")


def test_openvino_ir_is_cached_by_weights_and_a_corrupt_one_rebuilt(tiny_model, tmp_path, monkeypatch):
    from xbench.backends.openvino_backend import OpenVinoBackend, ir_path

    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path))
    first = OpenVinoBackend(str(tiny_model), "cpu", "fp32", threads=1)
    path = ir_path(tiny_model, "fp32")
    assert first.path == path and path.is_file() and path.with_suffix(".bin").is_file()
    assert ir_path(tiny_model, "bf16") == path  # bf16 is the f32 graph under another hint
    other = write_tiny_bert(tmp_path / "other" / tiny_model.name, seed=1)
    assert ir_path(other, "fp32") != path
    path.write_text("<not an IR")
    rebuilt = OpenVinoBackend(str(tiny_model), "cpu", "fp32", threads=1)
    assert path.read_text().startswith("<?xml")
    ids = np.array([[101, 2054, 102, 2003, 102]])
    np.testing.assert_allclose(rebuilt.forward(ids, np.ones_like(ids), np.zeros_like(ids)),
                               first.forward(ids, np.ones_like(ids), np.zeros_like(ids)), atol=1e-6)


def test_openvino_says_what_it_computed(tiny_model):
    """fp32 is pinned to f32 even where the plugin would pick bf16 by itself (AVX512-BF16, AMX)."""
    fp32 = create_backend(ModelInstanceConfig(backend="openvino", quantization="fp32"), str(tiny_model), threads=1)
    assert fp32.describe()["computed"] == "fp32"
    bf16 = create_backend(ModelInstanceConfig(backend="openvino", quantization="bf16"), str(tiny_model), threads=1)
    assert bf16.describe()["computed"] == ("bf16" if native_flags("bf16") else "fp32")


def test_bf16_on_a_cpu_without_bf16_instructions_is_refused_by_name(monkeypatch):
    import xbench.env

    monkeypatch.setattr(xbench.env, "cpu_features", lambda: ["avx2", "fma"])
    with pytest.raises(ConfigError, match="needs a CPU with avx512_bf16 or amx_bf16; .* has avx2, fma"):
        compose_config(["model_pool.instances.0.backend=openvino", "model_pool.instances.0.quantization=bf16"])


def test_onnx_graphs_are_fused_and_quantized(tiny_model):
    """The export is fused by ORT's transformer optimizer; int8 quantizes the fused attention too,
    and the fp16 graph (CUDA only, so not run here) is a valid graph with fp16 weights."""
    import onnx

    from xbench.backends.onnx_backend import ensure_onnx, fused_op_counts

    fp32 = fused_op_counts(ensure_onnx(tiny_model, "fp32"))
    assert fp32 == {"EmbedLayerNormalization": 1, "Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}
    assert fused_op_counts(ensure_onnx(tiny_model, "int8")).get("QAttention") == 2
    fp16 = onnx.load(str(ensure_onnx(tiny_model, "fp16")))
    onnx.checker.check_model(fp16)
    types = {t.data_type for t in fp16.graph.initializer if t.dims and np.prod(t.dims) > 64}
    assert types == {onnx.TensorProto.FLOAT16}


def test_compiled_backend_compiles_one_graph_for_every_shape(tiny_model):
    """Dynamic shapes, lone rows doubled: batch sizes 1..32 and lengths 3..200 share one graph."""
    from torch._dynamo.utils import counters

    b = create_backend(ModelInstanceConfig(backend="compiled"), str(tiny_model), threads=2)
    ref = create_backend(ModelInstanceConfig(backend="pytorch"), str(tiny_model), threads=2)
    rng = np.random.default_rng(0)
    graphs = []  # after each call; the first call compiles (or reuses an earlier test's graph)
    for rows, seq in [(32, 40), (1, 20), (7, 3), (1, 200), (2, 64), (32, 77)]:
        ids = rng.integers(1000, 2000, size=(rows, seq))
        arrays = (ids, np.ones_like(ids), np.zeros_like(ids))
        got = b.forward(*arrays)
        graphs.append(counters["stats"]["unique_graphs"])
        assert got.shape == (rows,)
        assert np.abs(got - ref.forward(*arrays)).max() < 1e-4
    assert len(set(graphs)) == 1, f"recompiled: graph count went {graphs}"
    assert "compile_s" in b.describe()


def tiny_encoder(kind: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    small = dict(num_labels=1, initializer_range=0.3)
    if kind == "xlm-roberta":  # bge-reranker's architecture: one token type, offset position ids
        return tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=514, type_vocab_size=1, **small))
    if kind == "distilbert":  # takes no token_type_ids
        return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, **small))
    return tf.ElectraForSequenceClassification(tf.ElectraConfig(
        vocab_size=30522, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, **small))


@pytest.mark.parametrize("kind", ["xlm-roberta", "distilbert", "electra"])
def test_other_encoder_architectures_run_on_every_cpu_backend(kind, tmp_path, monkeypatch):
    """Cross-encoders are not all BERT: the export, the fusion and the inputs adapt, and the
    fp32 paths agree with the PyTorch reference."""
    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path / "cache"))
    model_dir = write_tiny_model(tmp_path / kind, tiny_encoder(kind))
    batches = batches_for(model_dir, 64, batch=16)
    if kind == "xlm-roberta":  # its own tokenizer gives every token type 0 (BERT's marks the document 1)
        batches = [(idx, (ids, mask, np.zeros_like(types))) for idx, (ids, mask, types) in batches]
    ref = scores(model_dir, "pytorch", "fp32", batches, 64, packed=False)
    assert np.std(ref) > 0.1
    check(scores(model_dir, "onnx", "fp32", batches, 64), ref, ("abs", 1e-4), f"{kind} onnx fp32")
    if kind == "electra":  # CTranslate2 has no ELECTRA converter: refused by name
        with pytest.raises(BackendUnavailable, match="does not run 'electra'"):
            scores(model_dir, "ctranslate2", "fp32", batches, 64)
    else:
        check(scores(model_dir, "ctranslate2", "fp32", batches, 64), ref, ("abs", 1e-4), f"{kind} ctranslate2 fp32")
    check(scores(model_dir, "openvino", "fp32", batches, 64), ref, ("abs", 1e-4), f"{kind} openvino fp32")
    check(scores(model_dir, "pytorch", "int8", batches, 64), ref, ("rho", 0.0), f"{kind} pytorch int8")
    check(scores(model_dir, "onnx", "int8", batches, 64), ref, ("rho", 0.0), f"{kind} onnx int8")


def test_two_class_heads_score_the_log_odds_of_relevant(tmp_path, monkeypatch):
    """Rerankers trained as (not relevant, relevant) classifiers: every backend scores l1 - l0,
    so the served sigmoid is softmax's P(relevant). More than two labels is refused by name."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from xbench.errors import ModelError

    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     num_labels=2, initializer_range=0.3)
    model = BertForSequenceClassification(cfg)
    model_dir = write_tiny_model(tmp_path / "two-class", model)
    batches = batches_for(model_dir, 32, batch=16)
    with torch.inference_mode():
        want = np.concatenate([np.diff(model(*(torch.from_numpy(a) for a in (ids, mask, types))).logits.numpy())[:, 0]
                               for _, (ids, mask, types) in batches])
    order = np.concatenate([idx for idx, _ in batches])
    for backend in ("pytorch", "onnx", "mlx"):
        got = scores(model_dir, backend, "fp32", batches, 32)
        assert np.abs(got[order] - want).max() < 1e-4, backend
    three = write_tiny_model(tmp_path / "three", BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3)))
    with pytest.raises(ModelError, match="3 output labels"):
        resolve_model(str(three))


def test_every_backend_names_an_extra_that_installs_it_and_a_class_that_runs():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for spec in REGISTRY.values():
        if spec.extra:
            assert spec.extra in extras, f"{spec.name}: pyproject.toml has no extra {spec.extra!r}"
            listed = " ".join(extras[spec.extra]).lower()
            assert all(module.split(".")[0] in listed for module in spec.requires), (spec.name, spec.extra)
        assert set(spec.precisions) <= set(PRECISIONS) and dict(spec.limits).keys() <= set(spec.precisions)
        if not spec.missing():
            cls = spec.load_class()
            assert callable(getattr(cls, "forward", None)) and callable(getattr(cls, "describe", None)), spec.name


@pytest.mark.skipif("cuda" not in available_devices(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend,precision,packed", [
    ("pytorch", "fp16", True), ("pytorch", "fp16", False), ("pytorch", "bf16", True), ("compiled", "bf16", None),
    ("onnx", "fp16", None), ("ctranslate2", "fp16", None), ("ctranslate2", "int8", None)])
def test_cuda_paths_match_the_fp32_reference(tiny_setup, backend, precision, packed):
    model_dir, batches, ref = tiny_setup
    inst = ModelInstanceConfig(backend=backend, device="cuda", quantization=precision, packed=packed)
    b = create_backend(inst, str(model_dir), threads=1)
    got = np.empty(256, dtype=np.float32)
    for idx, arrays in batches:
        got[idx] = b.forward(*arrays)
    check(got, ref, ("rho", 0.99), f"{backend} {precision} cuda")


def test_backends_command_prints_the_matrix():
    from typer.testing import CliRunner

    from xbench.cli import app

    result = CliRunner().invoke(app, ["backends"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip() + ":" + line.split("│")[2].strip(): line
            for line in result.output.splitlines() if line.count("│") > 3}
    assert "yes" in rows["pytorch:cpu"] and "yes" in rows["onnx:cpu"]
    assert rows["pytorch:cpu"].count("yes") == 5  # fp32 fp16 bf16 int8 int4


def test_backends_command_says_which_precisions_this_cpu_computes_natively(monkeypatch):
    from typer.testing import CliRunner

    import xbench.env
    from xbench.cli import app

    monkeypatch.setattr(xbench.env, "cpu_features", lambda: ["avx2", "fma"])  # an AVX2-only CPU
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 3}
    assert "emulated" not in lines["fp32"] and "native" in lines["fp32"]
    assert "converted to fp32 in software" in lines["bf16"] and "no VNNI" in lines["int8"]
    openvino = next(line for line in result.output.splitlines() if line.startswith("│ openvino"))
    assert "no cpu flag" in openvino  # its bf16 needs AVX512-BF16 or AMX


def test_large_models_keep_their_onnx_weights_in_a_side_file(tiny_setup, tmp_path, monkeypatch):
    """Past EXTERNAL_DATA_BYTES (protobuf's 2 GiB cap) the weights go to `<file>.data` beside the
    graph; the cached pair loads and computes the same scores."""
    from xbench.backends import onnx_backend

    model_dir, batches, ref = tiny_setup
    monkeypatch.setenv("XBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(onnx_backend, "EXTERNAL_DATA_BYTES", 0)
    for precision, bar in (("fp32", ("abs", 1e-4)), ("int8", TINY_INT8_BAR)):
        check(scores(model_dir, "onnx", precision, batches, 256), ref, bar, f"onnx {precision} external data")
        path = onnx_backend.onnx_path(model_dir, precision)
        assert path.with_name(path.name + ".data").stat().st_size > path.stat().st_size
    assert not list(tmp_path.rglob(".build-*"))  # the temp folders are gone
