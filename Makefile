# Two commands on a fresh machine: `make demo` (install + a demo measurement), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# PyTorch's CPU wheel, from its CPU index, where no CUDA GPU is present (PyPI's torch is the
# multi-GB CUDA build); PyPI's where `nvidia-smi` finds one. Override with TORCH_INDEX=URL, or
# TORCH_INDEX= for PyPI alone.
TORCH_INDEX ?= $(if $(shell nvidia-smi -L 2>/dev/null),,https://download.pytorch.org/whl/cpu)
PIP_TORCH = pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
EXTRAS ?= dev,onnx,openvino,mlx,baseline,ctranslate2,ray,standins

INFINITY_VENV ?= .venv-infinity
AIPERF_VENV ?= .venv-aiperf
PEERS_VENV ?= .venv-peers

.PHONY: install infinity aiperf peers demo study test test-slow bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m $(PIP_TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The peers benchmark (benchmarks/peers.py): xbench beside the libraries a user would pick instead.
# Its own virtualenv: optimum and fastembed pin transformers and huggingface_hub below ours.
peers: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: pyproject.toml
	test -x $(PEERS_VENV)/bin/python || python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/$(PIP_TORCH)
	$(PEERS_VENV)/bin/pip install -q -e ".[dev,onnx,openvino,ctranslate2,peers]"
	touch $@

# Infinity, a peer rerank server, for the `xbench load --api infinity` integration test
# (tests/test_infinity.py). Its own virtualenv: its pins differ from ours.
infinity: $(INFINITY_VENV)/.installed

$(INFINITY_VENV)/.installed:
	test -x $(INFINITY_VENV)/bin/python || python3 -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install -q --upgrade pip
	$(INFINITY_VENV)/bin/$(PIP_TORCH)
	$(INFINITY_VENV)/bin/pip install -q "infinity-emb[server,torch]==0.0.78"
	touch $@

# NVIDIA AIPerf, an independent load tool (its cohere-rankings endpoint), for tests/test_aiperf.py
# and benchmarks/agree.py. Its own virtualenv: its pins differ from ours.
aiperf: $(AIPERF_VENV)/.installed

$(AIPERF_VENV)/.installed:
	test -x $(AIPERF_VENV)/bin/python || python3 -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install -q --upgrade pip
	$(AIPERF_VENV)/bin/pip install -q "aiperf==0.13.0"
	touch $@

# A short sweep over tokenizer, model and pipeline on the embedded default model,
# ending in a results table (results/demo/RUN/results.md) and charts (plots/index.html).
demo: install
	$(VENV)/bin/xbench sweep demo --new
	$(VENV)/bin/xbench plot "$$(ls -d results/demo/*/ | tail -n 1)" -o plots

# The whole reference study on this machine (about 25 minutes on 2 cores: every point runs until it converges).
study: install
	$(VENV)/bin/xbench sweep --all
	$(VENV)/bin/xbench plot "$$(ls -d results/study/*/ | tail -n 1)" -o plots

# The suite on tiny models and the real server (about 8 minutes on 2 cores) ...
test: install
	$(PY) -m pytest -q -m "not slow"

# ... and the full-size default model on every backend, Infinity and a Ray cluster (what `.ci/run` runs next).
test-slow: install
	$(PY) -m pytest -q -m slow

# Performance targets (slow; outside the test suite).
bench: install
	$(PY) benchmarks/padding.py
	$(PY) benchmarks/pipeline_overhead.py
	$(PY) benchmarks/backends.py
	$(PY) benchmarks/serve_vs_inprocess.py
	$(PY) benchmarks/launches.py

clean:
	rm -rf $(VENV) $(INFINITY_VENV) $(AIPERF_VENV) results plots outputs multirun
