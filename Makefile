# Two commands on a fresh machine: `make demo` (install + a demo measurement), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on Linux; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,onnx,mlx,baseline

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(VENV)/bin/xbench tokenize-bench -b 128 -c 16 -d 5 --warmup 1 tokenizer_pool.parallelism=false
	$(VENV)/bin/xbench tokenize-bench -b 128 -c 16 -d 5 --warmup 1 tokenizer_pool.parallelism=true
	$(VENV)/bin/xbench infer-bench -b 32 -c 4 -d 15 --warmup 3
	$(VENV)/bin/xbench pipeline-bench -b 32 -c 4 -d 15 --warmup 3

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/pipeline_overhead.py

clean:
	rm -rf $(VENV) results plots outputs multirun
