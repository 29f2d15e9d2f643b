#!/usr/bin/env bash
# The one GPU script: build, GPU tests, compute-sanitizer, benchmarks, summary table last.
#   bash benchmarks/gpu_check.sh                 # all stages
#   bash benchmarks/gpu_check.sh build tests     # some stages (a warm machine keeps the build between calls)
# Stages: env build tests sanitize bench summary. Logs and JSON go to $OUT (or ./gpu_check_out).
# Environment: BENCH_FILTER (pytest -k expression for the benchmarks), TEST_FILTER, TEST_MARK (for the tests),
#              TORCH_CUDA_ARCH_LIST (default 9.0 here, to keep the build short on the lent Hopper machines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env build tests sanitize bench summary)
status_file="$OUT/status.txt"
touch "$status_file"

note() { echo "$1: $2" | tee -a "$status_file"; }
has_stage() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

if has_stage env; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
  python3 -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/env.txt"
fi

if has_stage build; then
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  export MAX_JOBS="${MAX_JOBS:-16}"
  start=$(date +%s)
  if python3 -m pip install -v -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1; then
    note build "ok in $(( $(date +%s) - start )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  else
    note build "FAILED (tail of build.log below)"; tail -40 "$OUT/build.log"
  fi
  python3 -m facm_ext.info | tee "$OUT/info.txt"
fi

if has_stage tests; then
  python3 -m pytest python_tests -q --maxfail=25 -p no:cacheprovider ${TEST_MARK:+-m "$TEST_MARK"} ${TEST_FILTER:+-k "$TEST_FILTER"} \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  rc=$?
  note tests "exit $rc: $(tail -1 "$OUT/tests.log")"
  [ $rc -ne 0 ] && grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
fi

# The CUDA C++ kernels' small-shape GPU tests (one dtype, every size/layout/alignment case) under compute-sanitizer.
DEFAULT_SANITIZE_FILTER="dtype1 and (cuda_kernel_matches_reference or cuda_kernel_misaligned or cuda_staged_per_token_modulation or cuda_activations or cuda_gated_residual or cuda_swiglu or test_cuda_rope or test_gpu_cuda_forward or test_gpu_cuda_strided or cuda_rms_norm_rope or cuda_adaln_narrow_output) and not large"

if has_stage sanitize; then
  # memcheck for every kernel, racecheck for the shared-memory reductions and row staging of the norm kernel.
  for tool in memcheck racecheck; do
    FACM_EXT_SANITIZE=1 compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
      python3 -m pytest python_tests -q -x -p no:cacheprovider -m gpu -k "${SANITIZE_FILTER:-$DEFAULT_SANITIZE_FILTER}" \
      > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    errors=$(grep -E "ERROR SUMMARY: [0-9]+" "$OUT/sanitize_$tool.log" | awk '{s+=$4} END {print s+0}')
    note "sanitize-$tool" "exit $rc, $errors sanitizer errors: $(tail -1 "$OUT/sanitize_$tool.log")"
  done
fi

if has_stage bench; then
  FACM_EXT_BENCH_JSON="$OUT/bench.json" python3 -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
    --benchmark-disable-gc ${BENCH_FILTER:+-k "$BENCH_FILTER"} > "$OUT/bench.log" 2>&1
  note bench "exit $?: $(tail -1 "$OUT/bench.log")"
fi

if has_stage summary; then
  echo "================ gpu_check summary ================"
  cat "$status_file"
  if [ -f "$OUT/bench.json" ]; then
    python3 - "$OUT/bench.json" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
import _harness
data = json.load(open(sys.argv[1]))
print(data["device"], "torch", data["torch"], "ceilings", {k: round(v, 1) for k, v in data["ceilings"].items()})
print(_harness.format_table(data["rows"]))
PY
  fi
fi
