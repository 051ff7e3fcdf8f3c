#!/usr/bin/env bash
# GPU check (NVIDIA): fidelity and raw forward rate of the CUDA paths, then, per workload
# (MS MARCO-shaped and long-tailed), tokenize-bench, infer-bench (batcher + model pool on
# pre-tokenized pairs) and pipeline-bench (all of it) at batch 128, concurrency 16, ending in
# pipeline ÷ raw forward. Each infer/pipeline point costs its start-up, --warmup and at least -d
# seconds, so the default six paths (26 points) run past one 10-minute device call; the bar's
# question, model process against the backend in the main process, is 10 points:
#   GPU_PATHS="pytorch:fp16 pytorch:fp16:thread" GPU_FIDELITY_PATHS=pytorch:fp16 scripts/gpu_check.sh -d 6 --warmup 3
#   scripts/gpu_check.sh [extra overrides]    (a later -d or --warmup wins over the defaults)
# On a device with no package index: scripts/gpu_carry.py (its docstring gives the commands).
#   GPU_MODEL=DIR            a local model folder instead of the embedded default
#   GPU_PATHS="pytorch:fp16 ..."  the paths infer- and pipeline-bench run, backend:precision[:variants],
#                            variants joined by +: graphs (CUDA graphs), thread (model_pool.mode=thread:
#                            the backend in the main process, as before the model process)
#   GPU_FIDELITY_PATHS=pytorch:fp16,pytorch:fp16:graphs  the paths gpu_check.py scores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=results/gpu
MODEL=${GPU_MODEL:-xbench/minilm-l6-seeded}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PY" scripts/gpu_check.py --model "$MODEL" ${GPU_FIDELITY_PATHS:+--paths "$GPU_FIDELITY_PATHS"}
paths=${GPU_PATHS:-"pytorch:fp16 pytorch:fp16:thread pytorch:fp16:graphs pytorch:bf16 pytorch:fp32 compiled:fp16"}
common=(-b 128 -c 16 -d 10 --warmup 5 model_pool.instances.0.name="$MODEL" model_pool.instances.0.device=cuda
        batching.max_batch_size=256 batching.max_batch_tokens=65536 tokenizer_pool.workers=8)
for lengths in msmarco longtail; do
  "$PY" -m xbench tokenize-bench "${common[@]}" workload.lengths="$lengths" -o "$OUT/tokenize-$lengths.json" "$@"
  for path in $paths; do
    IFS=: read -r backend precision variant <<<"$path"
    options=()
    [[ "+$variant+" == *+graphs+* ]] && options+=(model_pool.instances.0.cuda_graphs=true)
    [[ "+$variant+" == *+thread+* ]] && options+=(model_pool.mode=thread)
    for command in infer-bench pipeline-bench; do
      "$PY" -m xbench "$command" "${common[@]}" -o "$OUT/$command-$backend-$precision${variant:+-$variant}-$lengths.json" \
        model_pool.instances.0.backend="$backend" model_pool.instances.0.quantization="$precision" \
        "${options[@]}" workload.lengths="$lengths" "$@"
    done
  done
done
"$PY" scripts/gpu_check.py --summary
