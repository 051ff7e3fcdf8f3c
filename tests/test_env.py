"""Machine facts: library versions are read without importing the libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy
import tokenizers
import torch
import transformers


def test_versions_are_the_libraries_own_and_cost_no_imports():
    code = ("import json, sys; from xbench.env import machine; m = machine(); "
            "print(json.dumps({'env': m, 'imported': sorted(k for k in ('onnxruntime', 'ctranslate2', 'mlx', "
            "'transformers') if k in sys.modules)}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["imported"] == []  # each of these took up to a second of every start, to read a string
    for module in (torch, transformers, tokenizers, numpy):
        assert out["env"][module.__name__] == module.__version__
