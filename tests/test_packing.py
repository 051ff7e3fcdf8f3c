"""Cost that follows real tokens: packed execution matches the padded model, the cost model fits
and caches, and the planner cuts long-tailed pairs into length groups."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from test_backends import tiny_encoder
from xbench.backends.base import relevance
from xbench.backends.packed import Packing, Shape, pack_inputs
from xbench.backends.torch_backend import TorchBackend
from xbench.config import BatchingConfig, compose_config
from xbench.core import cost_model
from xbench.bench.batches import collate
from xbench.core.batcher import Batcher
from xbench.core.cost_model import CostModel, fit, load_or_calibrate, plan
from xbench.core.pipeline import Pipeline
from xbench.core.tokenizer_pool import Encoded, TokenizerPool, load_tokenizer
from xbench.errors import ConfigError
from xbench.layout import unpad
from xbench.checkpoints import resolve_model
from xbench.workload import synthetic

from conftest import write_tiny_model


def mixed_batches(model_dir, n=48, rows=16):
    """Long-tailed pairs in arrival order (no bucketing), so every batch carries padding."""
    tok = TokenizerPool(load_tokenizer(model_dir, 512))
    enc = tok.encode(synthetic(n, seed=5, lengths="longtail").pairs(n))
    tok.close()
    return [collate(enc.ids[i:i + rows], enc.type_ids[i:i + rows]) for i in range(0, n, rows)]


def both_paths(model_dir, batches, precision="fp32"):
    padded = TorchBackend(str(model_dir), "cpu", precision, threads=2, packed=False)
    packed = TorchBackend(str(model_dir), "cpu", precision, threads=2, packed=True)
    assert packed.packed and not padded.packed
    return (np.concatenate([padded.forward(*b) for b in batches]),
            np.concatenate([packed.forward(*b) for b in batches]))


def architecture_batches(kind, tmp_path, tiny_model):
    """A tiny model of `kind` and its padded long-tailed batches."""
    model_dir = tiny_model if kind == "bert" else write_tiny_model(tmp_path / kind, tiny_encoder(kind))
    batches = mixed_batches(model_dir)
    if kind == "xlm-roberta":  # one token type
        batches = [(ids, mask, np.zeros_like(types)) for ids, mask, types in batches]
    return model_dir, batches


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta", "distilbert", "electra"])
def test_packed_execution_matches_the_padded_model(kind, tmp_path, tiny_model):
    model_dir, batches = architecture_batches(kind, tmp_path, tiny_model)
    assert min(float(m.mean()) for _, m, _ in batches) < 0.7  # real padding to remove
    ref, got = both_paths(model_dir, batches)
    assert np.std(ref) > 0.1
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.slow
def test_packed_default_model_matches_padded_in_fp32_and_int8_ranks_hold():
    model_dir = resolve_model("default").path
    batches = mixed_batches(model_dir, n=64, rows=32)
    ref, got = both_paths(model_dir, batches)
    assert np.abs(got - ref).max() <= 1e-4
    _, int8 = both_paths(model_dir, batches, "int8")
    from scipy.stats import spearmanr

    assert spearmanr(int8, ref).statistic >= 0.9


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta", "distilbert", "electra"])
def test_bucketed_packed_inputs_of_cuda_graphs_score_as_the_padded_model(kind, tmp_path, tiny_model):
    """The CUDA-graph path's host side on the CPU: real tokens packed in numpy with their positions,
    rounded up to a bucket whose spare tokens form spare pairs, and attention per pair by offsets
    (an SDPA loop standing in for flash attention). Only the real pairs' scores come back, and
    they are the padded model's."""
    from xbench.backends.cuda_graphs import GraphedEncoder, bucket

    model_dir, batches = architecture_batches(kind, tmp_path, tiny_model)
    padded = TorchBackend(str(model_dir), "cpu", "fp32", threads=2, packed=False)
    packed = TorchBackend(str(model_dir), "cpu", "fp32", threads=2, packed=True)
    graphed = GraphedEncoder(packed.model, torch.device("cpu"), packed.max_positions(packed.model), capture=False)
    flat = [unpad(*b) for b in batches]
    real = [Shape(len(ids), len(lengths), int(lengths.max())) for ids, _, lengths in flat]
    assert any(bucket(s, 512).tokens > s.tokens and bucket(s, 512).rows > s.rows for s in real)  # spare pairs in play
    ref = np.concatenate([padded.forward(*b) for b in batches])
    got = np.concatenate([relevance(graphed.forward(*f).numpy()) for f in flat])
    assert np.abs(got - ref).max() <= 1e-4 and graphed.eager_runs == len(batches)


def test_eager_variable_length_attention_scores_as_the_padded_model(monkeypatch, tiny_model):
    """The eager CUDA path's layout on the CPU: attention and the first-token query straight on
    the packed tokens by pair offsets (an SDPA loop standing in for flash attention)."""
    import xbench.backends.torch_backend as torch_backend

    monkeypatch.setattr(torch_backend, "flash_varlen_available", lambda device, dtype: True)
    ref, got = both_paths(tiny_model, mixed_batches(tiny_model))
    assert np.std(ref) > 0.1 and np.abs(got - ref).max() <= 1e-4


def test_bucketed_inputs_lay_out_spare_pairs_within_the_attention_length():
    from xbench.backends.cuda_graphs import bucket, token_bucket

    lengths = np.array([7, 3, 50, 1])
    ids = np.concatenate([np.arange(1, n + 1) * 10 + r for r, n in enumerate(lengths)])
    shape, buffer = pack_inputs(ids, np.zeros_like(ids), lengths, 2, bucket(Shape(61, 4, 50), 512))
    tokens, rows, longest = shape.tokens, shape.rows, shape.longest
    assert (tokens, longest) == (token_bucket(61), 64) and tokens >= 61 and rows % 16 == 0
    ids_v, types_v, pos_v, offsets, first = shape.views(buffer)
    assert ids_v[:61].tolist() == ids.tolist() and not ids_v[61:].any()
    assert pos_v[:7].tolist() == list(range(2, 9)) and pos_v[7:10].tolist() == [2, 3, 4]
    assert offsets[:5].tolist() == [0, 7, 10, 60, 61] and offsets[-1] == tokens
    assert (np.diff(offsets) <= longest).all() and (np.diff(offsets) >= 0).all()
    assert first[:4].tolist() == [0, 7, 10, 60]
    assert [token_bucket(n) for n in (1, 256, 257, 4000, 4097, 9000)] == [256, 256, 512, 4096, 4352, 9216]


def test_packed_inputs_of_a_flat_batch_need_no_bucket():
    lengths = np.array([3, 1, 2])
    ids = np.array([11, 12, 13, 21, 31, 32])
    shape, buffer = pack_inputs(ids, ids % 2, lengths, 0)
    assert shape == Shape(6, 3, 3) and len(buffer) == shape.size
    ids_v, types_v, pos_v, offsets, first = shape.views(buffer)
    assert ids_v.tolist() == ids.tolist() and types_v.tolist() == (ids % 2).tolist()
    assert pos_v.tolist() == [0, 1, 2, 0, 0, 1] and offsets.tolist() == [0, 3, 4, 6] and first.tolist() == [0, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_the_eager_packed_scores():
    model_dir = resolve_model("default").path
    batches = mixed_batches(model_dir, n=64, rows=32)
    eager = TorchBackend(str(model_dir), "cuda", "fp16", threads=2)
    graphed = TorchBackend(str(model_dir), "cuda", "fp16", threads=2, cuda_graphs=True)
    assert graphed.graphed is not None and eager.graphed is None
    ref = np.concatenate([eager.forward(*b) for b in batches])
    for _ in range(2):  # captured, then replayed
        got = np.concatenate([graphed.forward(*b) for b in batches])
        assert np.abs(got - ref).max() <= 2e-2
    assert graphed.describe()["replays"] >= len(batches)


def packing_of(lengths: list[int], grouped: bool = False) -> Packing:
    """The CPU packing of pairs of these lengths, offsets taken from `pack_inputs`' buffer."""
    lengths = np.array(lengths)
    shape, inputs = pack_inputs(np.zeros(lengths.sum(), np.int32), np.zeros(lengths.sum(), np.int32), lengths, 0)
    _, _, _, offsets, first = shape.views(torch.from_numpy(inputs))
    return Packing.of_lengths(lengths, offsets, first, grouped)


def test_packing_gathers_real_tokens_and_restores_the_layout():
    p = packing_of([3, 1, 4])
    assert p.cu_seqlens.tolist() == [0, 3, 4, 8] and p.first.tolist() == [0, 3, 4]
    x = torch.arange(12.0).reshape(3, 4, 1)
    packed = p.pack(x)
    assert packed[:, 0].tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    back = p.unpack(packed).reshape(3, 4)
    assert back.tolist() == [[0, 1, 2, 0], [4, 0, 0, 0], [8, 9, 10, 11]]
    assert p.key_mask[:, 0, 0].tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]
    full = packing_of([3, 3])
    assert full.key_mask is None and full.index is None  # no padding: no mask, no copies


def test_cpu_attention_runs_per_group_of_similar_lengths():
    lengths = [8, 9, 10, 209, 210]
    p = packing_of(lengths, grouped=True)
    assert [g.rows for g in p.groups] == [3, 2] and [g.longest for g in p.groups] == [10, 210]
    assert sum(len(g.tokens) for g in p.groups) == sum(lengths)


def test_packed_is_refused_by_name_on_backends_that_pad():
    with pytest.raises(ConfigError, match=r"packed=true: backend 'onnx' runs padded batches only.*pytorch"):
        compose_config(["model_pool.instances.0.backend=onnx", "model_pool.instances.0.packed=true"])


@pytest.mark.parametrize("overrides, message", [
    (["model_pool.instances.0.backend=onnx"], r"cuda_graphs=true: backend 'onnx' has no CUDA graph path; pytorch has"),
    ([], r"model_pool.instances.0.cuda_graphs=true needs device=cuda.*got device='cpu', quantization='fp32'"),
])
def test_cuda_graphs_are_refused_by_name_where_they_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([*overrides, "model_pool.instances.0.cuda_graphs=true"])


# -- the cost model ---------------------------------------------------------------------------

def brute_force_cost(lengths, cost, max_rows, max_padded_tokens=10**9):
    """Least total cost over every cut of the sorted order (small n only)."""
    s = sorted(lengths)
    n, best = len(s), float("inf")
    for mask in itertools.product([0, 1], repeat=n - 1):
        bounds = [0] + [i + 1 for i, m in enumerate(mask) if m] + [n]
        runs = [s[a:b] for a, b in zip(bounds, bounds[1:])]
        if all(len(r) <= max_rows and (len(r) == 1 or len(r) * r[-1] <= max_padded_tokens) for r in runs):
            best = min(best, sum(cost.batch_cost(r) for r in runs))
    return best


def test_packed_varlen_plans_are_the_fewest_batches_within_both_caps():
    # Packed with varlen attention, every cut computes the same tokens: the plan's fast path
    # fills batches greedily, and must still reach the least cost with the padded cap binding.
    rng = np.random.default_rng(2)
    cost = CostModel(overhead_s=3e-3, per_token_s=2e-7, per_attention_s=1e-9, packed=True, varlen_attention=True)
    for _ in range(30):
        lengths = rng.integers(5, 400, size=int(rng.integers(1, 11))).tolist()
        cuts = plan(lengths, cost, max_rows=4, max_padded_tokens=700)
        assert sorted(i for c in cuts for i in c) == list(range(len(lengths)))
        assert all(len(c) <= 4 and (len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 700) for c in cuts)
        got = sum(cost.batch_cost([lengths[i] for i in c]) for c in cuts)
        assert got == pytest.approx(brute_force_cost(lengths, cost, 4, 700))


@pytest.mark.parametrize("packed,multiple", [(False, 1), (True, 1), (False, 16)])
def test_plan_finds_the_least_cost_cut(packed, multiple):
    rng = np.random.default_rng(1)
    cost = CostModel(overhead_s=3e-3, per_token_s=2e-5, per_attention_s=2e-8, packed=packed, varlen_attention=packed,
                     length_multiple=multiple)
    for _ in range(20):
        lengths = rng.integers(5, 400, size=int(rng.integers(1, 11))).tolist()
        cuts = plan(lengths, cost, max_rows=4, max_padded_tokens=10**9)
        assert sorted(i for c in cuts for i in c) == list(range(len(lengths)))
        assert all(len(c) <= 4 for c in cuts)
        got = sum(cost.batch_cost([lengths[i] for i in c]) for c in cuts)
        assert got == pytest.approx(brute_force_cost(lengths, cost, 4))


def test_plan_splits_long_tails_and_keeps_uniform_batches_full():
    cost = CostModel(overhead_s=5e-3, per_token_s=1e-4, per_attention_s=1e-7)
    longtail = [20] * 28 + [480] * 4
    cuts = plan(longtail, cost, max_rows=32, max_padded_tokens=16384)
    assert sorted(len(c) for c in cuts) == [4, 28]  # the long ones apart: no short pair padded to 480
    uniform = [64] * 96
    assert [len(c) for c in plan(uniform, cost, 32, 16384)] == [32, 32, 32]
    assert all(len(c) * 480 <= 1000 for c in plan([480] * 8, cost, 32, 1000))  # the padded-token cap holds


def test_fit_recovers_the_cost_terms():
    truth = CostModel(overhead_s=0.02, per_token_s=1.2e-4, per_attention_s=1e-7)
    samples = [(r, n, truth.batch_cost([n] * r)) for r, n in cost_model.CALIBRATION_SHAPES]
    got = fit(samples)
    assert got.source == "calibrated"
    for field in ("overhead_s", "per_token_s", "per_attention_s"):
        assert getattr(got, field) == pytest.approx(getattr(truth, field), rel=1e-3)


def sawtooth(rows, length):
    """Seconds of a padded engine whose kernels run a multiple of 16 tokens fastest: each token
    short of the next multiple costs as much as three."""
    short = -length % 16
    return 1e-3 + 1e-5 * rows * (length + 3 * short)


@pytest.mark.parametrize("engine,aligned", [(sawtooth, True), (lambda rows, length: 1e-3 + 1e-5 * rows * length, False)])
def test_calibration_pads_to_a_multiple_of_16_only_where_it_is_measured_to_pay(monkeypatch, engine, aligned):
    monkeypatch.setattr(cost_model, "_timed", lambda forward, rows, length: engine(rows, length))
    got, _ = cost_model.calibrate(lambda rows, length: None, probe_alignment=True)
    assert got.length_multiple == (16 if aligned else 1)
    exact, padded = got.alignment_probe_s
    assert (padded < exact) == aligned
    assert got.width(95) == (96 if aligned else 95)
    assert cost_model.calibrate(lambda rows, length: None)[0].length_multiple == 1  # a packed backend: no probe
    # planned at the padded width: a pair of 97 tokens costs a batch of 112
    assert got.batch_cost([97, 20]) == pytest.approx(got.batch_cost([got.width(97)] * 2))


def test_a_batch_padded_to_the_multiple_scores_as_at_its_longest(tiny_model):
    tok = TokenizerPool(load_tokenizer(tiny_model, 512))
    enc = tok.encode(synthetic(24, seed=6, lengths="longtail").pairs(24))
    tok.close()
    b = Batcher(BatchingConfig(max_batch_size=8))
    b.cost = CostModel(overhead_s=1e-3, per_token_s=1e-5, per_attention_s=1e-8, length_multiple=16)
    from xbench.core.request import RerankJob

    job = RerankJob([])
    job.queued(enc)
    b.put(job)
    backend = TorchBackend(str(tiny_model), "cpu", "fp32", threads=2, packed=False)
    for _ in range(3):
        batch = b.next_batch()
        ids, mask, types = batch.padded
        assert ids.shape[1] % 16 == 0 and ids.shape[1] - 16 < batch.longest <= ids.shape[1]
        assert batch.padded_tokens == ids.size and (mask.sum(1) == batch.lengths).all()
        exact = backend.forward(*collate([enc.ids[i] for i in batch.index], [enc.type_ids[i] for i in batch.index]))
        np.testing.assert_allclose(batch.forward(backend), exact, atol=1e-5)


def test_calibration_is_cached_per_key(tmp_path):
    calls = []

    def forward(rows, length):
        calls.append((rows, length))

    key = {"backend": "pytorch", "precision": "fp32", "threads": 2}
    first = load_or_calibrate(key, forward, folder=tmp_path)
    timed = len(calls)
    assert first.source == "calibrated" and timed >= len(cost_model.CALIBRATION_SHAPES)
    again = load_or_calibrate(key, forward, folder=tmp_path)
    assert again.source == "cached" and len(calls) == timed  # nothing re-timed
    probed = load_or_calibrate({**key, "backend": "onnx"}, forward, folder=tmp_path, probe_alignment=True)
    assert load_or_calibrate({**key, "backend": "onnx"}, forward, folder=tmp_path) == replace(probed, source="cached")
    assert (again.overhead_s, again.per_token_s) == (first.overhead_s, first.per_token_s)
    load_or_calibrate({**key, "precision": "int8"}, forward, folder=tmp_path)
    assert len(calls) > timed  # another precision is another fit


# -- the batcher and the pipeline ---------------------------------------------------------------

def test_a_lone_long_tailed_request_is_cut_into_length_groups():
    b = Batcher(BatchingConfig(max_batch_size=32))
    b.cost = CostModel(overhead_s=5e-3, per_token_s=1e-4, per_attention_s=1e-7)
    lengths = [12, 400, 15, 18, 450, 20, 16, 14] * 4
    ids = [np.ones(n, dtype=np.int32) for n in lengths]
    from xbench.core.request import RerankJob

    job = RerankJob([])
    job.queued(Encoded.from_pairs(ids, [np.zeros(n, dtype=np.int32) for n in lengths]))
    b.put(job)  # nothing else queued or on its way
    widths = []
    while sum(widths) < len(lengths):
        batch = b.next_batch()
        widths.append(batch.rows)
        input_ids, mask, _ = batch.padded
        assert input_ids.shape[1] < 100 or mask.min() == 1  # no short pair padded to 400+
    assert len(widths) >= 2


def test_ten_thousand_mixed_documents_come_back_complete_and_in_order(tiny_overrides):
    w = synthetic(10_000, seed=3, lengths="longtail")
    pairs = w.pairs(10_000)
    rows = []
    cfg = compose_config(tiny_overrides + ["model_pool.instances.0.max_length=128"])
    with Pipeline.from_config(cfg, observe_batch=lambda batch, s: rows.append(batch.rows)) as pipe:
        got = pipe.submit(pairs).result(timeout=300).logits
        solo = np.concatenate([pipe.submit(pairs[i:i + 1]).result(timeout=30).logits for i in (0, 4321, 9999)])
    assert len(got) == 10_000 and len(rows) > 10_000 // 32
    np.testing.assert_allclose(got[[0, 4321, 9999]], solo, atol=1e-5)
