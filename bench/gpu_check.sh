#!/usr/bin/env bash
# GPU readiness, in one prepared run of at most ~8 minutes on one H100 / H200:
#   bash bench/gpu_check.sh OUT_DIR
# 1. the Pallas kernel tests compiled for the GPU (the same files run interpreted on CPU);
# 2. engine exactness with attention_impl="pallas" (bench/gpu_check.py exactness);
# 3. the attention and throughput benchmarks (JSON + PNG into OUT_DIR);
# 4. achieved HBM bandwidth of the decode and ragged kernels vs a device-to-device copy;
# 5. tensor parallelism, k = 1 vs all devices (a one-GPU machine records "skipped").
# Every step runs under its own time limit and the script goes on after a failure; the
# exit status is the number of failed steps. Needs jax with CUDA and this project's
# dependencies (ml-collections may have to be carried as a wheel: see the device notes).
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=0
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s)"
  local start=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
step env 60 "$PY" -c "import jax; print(jax.__version__, jax.devices());
assert jax.default_backend() == 'gpu', 'no GPU backend'"
step kernel_tests 150 "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_paged_attention_kernel.py tests/test_ragged_paged_attention_kernel.py
step exactness 120 "$PY" -m bench.gpu_check exactness "$OUT"
step attention 60 "$PY" -m bench.attention --out-dir "$OUT"
step throughput 60 "$PY" -m bench.throughput --quick --out-dir "$OUT"
step bandwidth 60 "$PY" -m bench.gpu_check bandwidth "$OUT"
step tensor_parallel 90 "$PY" -m bench.gpu_check tensor_parallel "$OUT"
echo "failed steps: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
