import pytest

from xbench.config import compose_config
from xbench.errors import ConfigError


def test_defaults_compose_with_the_embedded_model():
    cfg = compose_config([])
    assert cfg.model_pool.instances[0].name == "xbench/minilm-l6-seeded"
    assert cfg.experiment.batch_sizes == [128]


def test_overrides_take_effect():
    cfg = compose_config(["model_pool.instances.0.quantization=bf16", "tokenizer_pool.workers=2"])
    assert cfg.model_pool.instances[0].quantization == "bf16"
    assert cfg.tokenizer_pool.workers == 2


@pytest.mark.parametrize("override,fragment", [
    ("batching.max_batch_sise=3", "max_batch_sise"),
    ("tokenizer_pool.workers=many", "tokenizer_pool.workers"),
    ("model_pool.instances.0.backend=tensorflow", "pytorch"),
    ("model_pool.instances.0.quantization=fp8", "fp32, fp16, bf16, int8, int4"),
    ("model_pool.instances.0.device=mps", "available: cpu"),
    ("model_pool.instances.0.device=tpu", "runs on cpu, cuda, mps"),
    ("experiment.batch_sizes=[0]", "experiment.batch_sizes=0"),
    ("model_pool.workers=-1", "model_pool.workers=-1"),
    ("tokenizer_pool.mode=fiber", "thread, process"),
])
def test_bad_values_name_the_key_and_the_accepted_values(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        compose_config([override])


def test_unknown_experiment_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_experiment"):
        compose_config([], experiment="no_such_experiment")


def test_backend_alias_mps_means_pytorch_on_mps():
    with pytest.raises(ConfigError, match="device='mps' is not present"):
        compose_config(["model_pool.instances.0.backend=mps"])


def test_model_workers_left_open_are_two_beside_cuda_and_one_on_the_cpu():
    from xbench.core.model_pool import default_workers

    assert compose_config([]).model_pool.workers is None
    assert default_workers("cuda") == default_workers("cuda:1") == 2
    assert default_workers("cpu") == default_workers("mps") == 1
    assert compose_config(["model_pool.workers=3"]).model_pool.workers == 3


def test_tokenizer_workers_left_open_scale_with_the_cores_beside_cuda_only(monkeypatch):
    import xbench.core.tokenizer_pool as tokenizer_pool

    assert compose_config([]).tokenizer_pool.workers is None
    for cores, beside_cuda in ((16, 8), (64, 8), (6, 3), (1, 1)):
        monkeypatch.setattr(tokenizer_pool, "usable_cores", lambda: cores)
        assert tokenizer_pool.default_workers("cuda:0") == beside_cuda
        assert tokenizer_pool.default_workers("cpu") == 1
    assert compose_config(["tokenizer_pool.workers=3"]).tokenizer_pool.workers == 3
