#!/usr/bin/env bash
# GPU check (docs/testing.md): on a machine with a GPU, the `gpu` tests (the GPU gives the CPU's
# descriptors and training weights) and the GPU throughput (tools/gpu_bench.py), each capped
# (3 + 4 minutes). Where there is no GPU it prints "no GPU" and exits 0.
#
#   bash tools/gpu_check.sh                          # from the repository root
#   PYTHON=/path/to/python bash tools/gpu_check.sh   # an interpreter that has TensorFlow 2.20
#
# Python: $PYTHON if set, else .venv/bin/python, else a new .venv (python3.11, or $VENV_PYTHON)
# with tfmet[test] and tensorflow[and-cuda] (TensorFlow's CUDA libraries), which needs PyPI.
# Exit status: 0 when the tests pass and every benchmark ran (or when there is no GPU), 1 when
# a test or a benchmark failed, 2 when no usable Python was found. With REQUIRE_GPU=1, "no GPU"
# exits 1 (for a machine that is meant to have one).
set -u
cd "$(dirname "$0")/.." || exit 2
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}" PYTHONUNBUFFERED=1

no_gpu() {
    echo "no GPU: $1"
    [ "${REQUIRE_GPU:-0}" = 1 ] && exit 1
    exit 0
}

# 1. A GPU at all? (Before any Python: a CPU machine never builds a virtual environment.)
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
gpus=$(nvidia-smi -L 2>/dev/null | grep '^GPU') || no_gpu "nvidia-smi lists none"
echo "nvidia-smi: ${gpus//$'\n'/; }"

# 2. Which Python.
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON origin="PYTHON=$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python origin="the repository's .venv"
else
    base=${VENV_PYTHON:-python3.11}
    command -v "$base" >/dev/null 2>&1 || {
        echo "no .venv and no $base to make one: set PYTHON=<a python with tensorflow 2.20>"
        exit 2
    }
    echo "no .venv: making one with $base (pip install -e '.[test]' 'tensorflow[and-cuda]')"
    "$base" -m venv .venv && .venv/bin/pip install -q -e ".[test]" "tensorflow[and-cuda]==2.20.0" || {
        echo "could not make .venv (no PyPI here?): set PYTHON=<a python with tensorflow 2.20>"
        exit 2
    }
    py=.venv/bin/python origin="a new .venv"
fi
versions=$("$py" -c 'import sys, tensorflow as tf, keras; print(f"Python {sys.version.split()[0]}, TensorFlow {tf.__version__}, Keras {keras.__version__}")' 2>&1) || {
    echo "$py ($origin) cannot import tensorflow and keras: $(echo "$versions" | tail -1)"
    exit 2
}
versions=$(echo "$versions" | tail -1)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's tfmet, whatever $py has
echo "python: $py ($origin): $versions"

# 3. Does TensorFlow see the GPU? (pip's tensorflow needs the and-cuda extra's CUDA libraries.)
seen=$("$py" -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' 2>/dev/null | tail -1)
if [ "${seen:-0}" = 0 ]; then
    echo "WARNING: nvidia-smi lists a GPU but TensorFlow does not see it: its CUDA libraries are"
    echo "WARNING: probably missing ($py -m pip install 'tensorflow[and-cuda]==2.20.0')"
    no_gpu "TensorFlow lists none"
fi

# Everything below is bounded: 3 minutes for the tests, 4 for the benchmark.
limit() { if command -v timeout >/dev/null 2>&1; then timeout "$@"; else shift; "$@"; fi; }
summary=$(mktemp) log=$(mktemp)
trap 'rm -f "$summary" "$log"' EXIT

echo
echo "== 1/2 tests marked gpu (tests/gpu) =="
limit 180 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee "$log"
tests_rc=${PIPESTATUS[0]}
tests_line=$(grep -E '(passed|failed|skipped|error)' "$log" | tail -1)
[ "$tests_rc" = 124 ] && tests_line="timed out after 180 s"

echo
echo "== 2/2 throughput (tools/gpu_bench.py) =="
limit 240 "$py" tools/gpu_bench.py --device=gpu --summary_file="$summary"
bench_rc=$?

echo
echo "== summary =="
echo "python: $py ($origin): $versions"
echo "gpu tests: ${tests_line:-no result} (exit $tests_rc)"
case $bench_rc in
    0) echo "bench: all ran" ;;
    124) echo "bench: timed out after 240 s; the table holds what it measured" ;;
    *) echo "bench: exit $bench_rc (a measurement failed, or it stopped)" ;;
esac
[ -s "$summary" ] && cat "$summary"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && exit 0
exit 1
