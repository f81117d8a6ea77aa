#!/usr/bin/env bash
# Everything this project checks and times on a GPU, as one command for a lent machine:
#   bash scripts/gpu_check.sh            (device tool: run it from the repo root; results land in $OUT)
# 1. correctness on CUDA (every impl vs the float64 reference; Triton kernel tests; bf16/fp16
# weights keep every step under stochastic rounding and Kahan), 2. the step benchmark (Triton /
# foreach Lion vs fused AdamW, the pure-bf16 rows: bf16 weights + bf16 state with each
# param_rounding against bf16 fused AdamW, bitsandbytes and lion-pytorch when installed,
# device-copy bandwidth). About 6 minutes on an H200; uses the machine's own python3
# (torch, triton, transformers preinstalled there), with lion_hf from this checkout.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -m gpu tests/test_lion.py tests/test_triton_kernel.py tests/test_dispatch.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 300 python3 scripts/bench_optimizer_step.py --device cuda --profiles minilm base large llama-1b \
    --steps 50 --no-for-loop --out "$OUT/bench_cuda" 2>&1 | tee "$OUT/bench_cuda.log"
