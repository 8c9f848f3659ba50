#!/usr/bin/env bash
# Every GPU check in one run, for a machine with a CUDA device and torch/transformers/peft/pytest
# installed: the two GPU benchmarks, then the CUDA tests. Results land in OUTDIR:
#   gpu.csv, gpu-clocks.csv (SM clock, power and throttle reasons every 0.5 s, read-only), gpu-scoring.json,
#   gpu-scoring-packed.json, gpu-training.json, gpu-tests.log, gpu-cuda-tests.log, and each step's
#   stderr (*.err)
# Usage: bench/device_checks.sh OUTDIR [STEP...]   STEP: scoring, training, tests (default: all three;
#        each step has its own time limit, and each runs whether or not the one before it passed), or
#        the short ones: packed (gpu_scoring.py --only packed), cuda-tests (tests/test_gpu.py alone)
set -u
out=${1:?usage: bench/device_checks.sh OUTDIR [scoring] [training] [tests] [packed] [cuda-tests]}
shift
steps=" ${*:-scoring training tests} "
for s in $steps; do
    case $s in scoring | training | tests | packed | cuda-tests) ;; *) echo "unknown step: $s" >&2 && exit 2 ;; esac
done
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" 2>&1
step() {  # step NAME SECONDS STDOUT STDERR CMD...: run with a time limit if NAME was asked for
    local name=$1 limit=$2 stdout=$3 stderr=$4 t0=$SECONDS
    shift 4
    [[ $steps == *" $name "* ]] || return 0
    timeout "$limit" "$@" >"$out/$stdout" 2>"$out/$stderr"
    echo "$stdout: rc=$? in $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 500 >"$out/gpu-clocks.csv" 2>&1 &
sampler=$!
step scoring 360 gpu-scoring.json gpu-scoring.err python3 bench/gpu_scoring.py
step packed 300 gpu-scoring-packed.json gpu-scoring-packed.err python3 bench/gpu_scoring.py --only packed
step training 150 gpu-training.json gpu-training.err python3 bench/gpu_training.py
# The tiny benchmark smoke test is left out: it runs on CPU (CI runs it), and its CPU compile alone
# outlasted this step's limit on a 16-core device machine.
step tests 300 gpu-tests.log gpu-tests.err python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
    --deselect tests/test_scoring_hf.py::test_gpu_bench_tiny_smoke tests/test_gpu.py tests/test_scoring_hf.py
step cuda-tests 150 gpu-cuda-tests.log gpu-cuda-tests.err python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
    tests/test_gpu.py
kill $sampler 2>/dev/null
