#!/usr/bin/env bash
# Every GPU check in one run, for a machine with a CUDA device and torch/transformers/peft/pytest
# installed: the two GPU benchmarks, then the CUDA tests. Results land in OUTDIR:
#   gpu.csv, gpu-scoring.json, gpu-training.json, gpu-tests.log, and each step's stderr (*.err)
# Usage: bench/device_checks.sh OUTDIR        (each step has its own time limit; all run regardless)
set -u
out=${1:?usage: bench/device_checks.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" 2>&1
step() {  # step SECONDS STDOUT STDERR CMD...: run with a time limit, report its exit status
    local limit=$1 stdout=$2 stderr=$3 t0=$SECONDS
    shift 3
    timeout "$limit" "$@" >"$out/$stdout" 2>"$out/$stderr"
    echo "$stdout: rc=$? in $((SECONDS - t0)) s"
}
step 240 gpu-scoring.json gpu-scoring.err python3 bench/gpu_scoring.py
step 150 gpu-training.json gpu-training.err python3 bench/gpu_training.py
step 150 gpu-tests.log gpu-tests.err python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
    tests/test_gpu.py tests/test_scoring_hf.py
