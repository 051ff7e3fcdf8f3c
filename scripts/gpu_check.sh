#!/usr/bin/env bash
# GPU check (NVIDIA): fidelity and raw forward rate of the CUDA paths, then pipeline-bench at
# batch 128, concurrency 16 for each CUDA path on the MS MARCO-shaped and the long-tailed
# workload. Runs in under five minutes on an H100.
#   scripts/gpu_check.sh [extra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_RESULTS:-results/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PY" scripts/gpu_check.py
paths="pytorch:fp32 pytorch:fp16 pytorch:bf16 compiled:fp16"
if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  paths="$paths onnx:fp16"
else
  echo "onnx on cuda skipped: onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
fi
for lengths in msmarco longtail; do
  for path in $paths; do
    backend=${path%%:*}; precision=${path##*:}
    "$PY" -m xbench pipeline-bench -b 128 -c 16 -d 10 --warmup 5 -o "$OUT/pipeline-$backend-$precision-$lengths.json" \
      model_pool.instances.0.backend="$backend" model_pool.instances.0.device=cuda \
      model_pool.instances.0.quantization="$precision" batching.max_batch_size=256 batching.max_batch_tokens=65536 \
      tokenizer_pool.workers=4 workload.lengths="$lengths" "$@"
  done
done
