#!/usr/bin/env bash
# Every CUDA check and timing in one go, for a short lease of a GPU machine:
#     bash benchmarks/run_on_gpu.sh OUTDIR
# Each step has its own time limit and the next runs whatever happened, so one failure costs one
# table, not the lease. Logs land in OUTDIR; copy the tables into benchmarks/RESULTS.md.
out=${1:?usage: run_on_gpu.sh OUTDIR}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# kernels/ is imported as dinfer_kernels (see pyproject.toml): install the tree in place first
$py -m pip install -q --no-deps --no-build-isolation -e . || echo "editable install failed"
nvidia-smi -L
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# kernels vs references, engine vs reference sampler, kernel timings, the 8B-shaped forward and engine
timeout 180 $py benchmarks/kernels_gpu.py 2>&1 | tee "$out/kernels_gpu.txt"
# the main job end to end: client -> ZeroMQ -> a worker process on the GPU
timeout 40 $py -m dinfer_async.batch examples/prompts.jsonl "$out/batch_cuda.jsonl" --device cuda 2>&1 | tail -3
# the bundled model through the engine on the GPU, float32 then bfloat16
timeout 130 $py benchmarks/engine_speed.py --device cuda --prompts 50 \
    --configs threshold:dual,credit:dual,threshold:none 2>&1 | tee "$out/engine_cuda_float32.txt"
timeout 90 $py benchmarks/engine_speed.py --device cuda --dtype bfloat16 --prompts 25 \
    --configs threshold:dual,credit:dual 2>&1 | tee "$out/engine_cuda_bfloat16.txt"
