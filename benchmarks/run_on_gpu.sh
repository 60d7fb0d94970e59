#!/usr/bin/env bash
# Every CUDA check and timing in one go, for a short lease of a GPU machine:
#     bash benchmarks/run_on_gpu.sh OUTDIR
# Each step has its own time limit and the next runs whatever happened, so one failure costs one
# table, not the lease. Logs land in OUTDIR; copy the tables into benchmarks/RESULTS.md.
# Before a lease: `python benchmarks/kernels_gpu.py --dry-run` runs the MoE and confidence steps
# on the CPU (small sizes, Triton interpreted), and `env -u TRITON_INTERPRET python
# benchmarks/compile_check.py` compiles the new kernels for sm_90 without a GPU, so no lease is
# spent on a typo or a compile error.
# STEPS picks steps (default all: their limits add up to ~19 minutes, so a 10-minute command
# limit needs two calls, e.g. STEPS="kernels moe confidence" then STEPS="forward batch engine nosync
# joins graphs").
# Opt-in (not in the default list): STEPS="ep", expert parallel on every GPU, up to 7 minutes.
# A 15-minute lease (machine start included) fits about one call: run the unchecked code first,
#     STEPS="graphs nosync moe" bash benchmarks/run_on_gpu.sh OUT    # limits add up to 9 minutes
# then, if time is left, STEPS="joins confidence forward" (or "ep" on a machine with 2 or more GPUs).
out=${1:?usage: run_on_gpu.sh OUTDIR}
want() { [[ " ${STEPS:-kernels moe confidence forward batch engine nosync joins graphs} " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# kernels/ is imported as dinfer_kernels (see pyproject.toml): install the tree in place first
$py -m pip install -q --no-deps --no-build-isolation -e . || echo "editable install failed"
nvidia-smi -L
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# kernels vs references, engine vs reference sampler, kernel timings
want kernels && timeout 120 $py benchmarks/kernels_gpu.py --sections check,kernels 2>&1 | tee "$out/kernels_gpu.txt"
# MoE at LLaDA-MoE-7B-A1B's and LLaDA2.0-mini's shapes: engine tokens (grouped kernel vs the loop),
# the Triton grouped GEMM vs torch._grouped_mm / dense / loop, the whole MoE block (graph, no sync)
want moe && timeout 150 $py benchmarks/kernels_gpu.py --sections moe 2>&1 | tee "$out/moe_gpu.txt"
# the confidence kernel on [32 x 126,464] and [32 x 157,184] bf16: one program per row vs split
want confidence && timeout 60 $py benchmarks/kernels_gpu.py --sections confidence 2>&1 | tee "$out/confidence_gpu.txt"
# the 8B-shaped block forward and the engine on it
want forward && timeout 120 $py benchmarks/kernels_gpu.py --sections forward 2>&1 | tee "$out/forward_gpu.txt"
# the main job end to end: client -> ZeroMQ -> a worker process on the GPU
want batch && timeout 40 $py -m dinfer_async.batch examples/prompts.jsonl "$out/batch_cuda.jsonl" --device cuda 2>&1 | tail -3
# the bundled model through the engine on the GPU, float32 then bfloat16
want engine && timeout 160 $py benchmarks/engine_speed.py --device cuda --prompts 50 \
    --configs threshold:dual,credit:dual,threshold:none --suffix-windows 32 2>&1 | tee "$out/engine_cuda_float32.txt"
want engine && timeout 90 $py benchmarks/engine_speed.py --device cuda --dtype bfloat16 --prompts 25 \
    --configs threshold:dual,credit:dual 2>&1 | tee "$out/engine_cuda_bfloat16.txt"
# expert parallel (issue 16): all-reduce vs all-to-all dispatch, and tensor parallel alone, at
# LLaDA-MoE-7B-A1B's whole shape (random bf16 weights, nccl), T = 1, 2, 4, 8 up to the GPU count
if want ep; then
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    sizes=1
    for t in 2 4 8; do if (( t <= ngpu )); then sizes+=",$t"; fi; done
    if (( ngpu < 2 )); then echo "ep: $ngpu GPU: expert parallel needs 2 or more; timing T = 1 only"; fi
    timeout 420 $py benchmarks/ep_dispatch.py --device cuda --dtype bfloat16 --full --sizes "$sizes" \
        --tokens 32,256,1024 2>&1 | tee "$out/ep_dispatch_gpu.txt"
fi
# issue 15 item 2: the engine's block steps with no host sync between checks (4 steps a check),
# every step region under torch.cuda.set_sync_debug_mode("error") (DINFER_SYNC_CHECK=1): a sync
# there fails the run with torch's message; guarded, so a failure costs only this table
want nosync && ( set -o pipefail; DINFER_SYNC_CHECK=1 timeout 90 $py benchmarks/engine_speed.py --device cuda \
    --prompts 10 --steps-per-check 4 --configs threshold:dual,fixed:dual,credit:vicinity,joint:none \
    2>&1 | tee "$out/engine_cuda_nosync.txt" || echo "nosync step failed (see $out/engine_cuda_nosync.txt)" )
# issue 15 item 5a: requests joining running rounds (the default) vs waiting for them to end:
# steps and seconds to first update and to finish, tokens/s, answers identical (bundled model)
want joins && ( set -o pipefail; timeout 60 $py benchmarks/arrivals.py --device cuda --requests 64 \
    --rate 1 --decoder fixed --steps 32 --repeats 2 2>&1 | tee "$out/arrivals_cuda.txt" \
    || echo "joins step failed (see $out/arrivals_cuda.txt)" )
# issue 15 item 1: graph-captured block steps (workers/graphs.py, opt-in): the CUDA replay test,
# then the engine with cuda_graphs off vs on (tokens identical, ms per forward, tokens/s) on the
# bundled model (float32, bfloat16) and the LLaDA-8B shape (random bf16 weights, batch 1 and 16);
# exit status 1 if any tokens differ. Guarded, so a failure costs only these tables
if want graphs; then
    ( set -o pipefail; timeout 60 $py -m pytest tests/test_graphs.py -q -k cuda 2>&1 \
        | tee "$out/graphs_pytest_cuda.txt" || echo "graphs: the CUDA replay test failed" )
    ( set -o pipefail; timeout 90 $py benchmarks/graphs_speed.py --device cuda --prompts 8 2>&1 \
        | tee "$out/graphs_cuda_float32.txt" || echo "graphs step (float32) failed" )
    ( set -o pipefail; timeout 150 $py benchmarks/graphs_speed.py --device cuda --dtype bfloat16 \
        --prompts 8 --configs threshold:dual,fixed:dual --llada8b 2>&1 \
        | tee "$out/graphs_cuda_bfloat16.txt" || echo "graphs step (bfloat16, 8B shape) failed" )
fi
