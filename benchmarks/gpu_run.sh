#!/usr/bin/env bash
# One device session: the Triton kernel tests compiled on CUDA, then the GPU benchmark.
# Results go to $OUT (or benchmarks/results when OUT is unset).
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=src TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/kernel_tests_cuda.log" | tail -15
timeout 240 python3 benchmarks/gpu_kernels.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | tail -40
