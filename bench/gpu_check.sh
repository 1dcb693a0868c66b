#!/usr/bin/env bash
# The one script to run on a lent GPU machine (H100/H200; Python 3.12 with torch 2.11+cu130, nvcc
# 13.0, no network). On the development machine first:
#
#   bash bench/fetch_gpu_wheels.sh     # .whl/: nvidia-cutlass (headers), scikit-build-core, pybind11
#
# then the device tool: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 600 (measured
# on an H200 before the engine existed: ~3 minutes after the machine is up; the GPU tests, the
# benchmarks and e2e now have their own limits, 7 + 7 + 5 minutes at most). It
#   1. installs the carried wheels into /tmp/site (no deps) and puts that on PYTHONPATH,
#   2. builds and installs twotower_rt there without build isolation, with TWOTOWER_RT_BUILD_CUDA=ON
#      (fails rather than installing without _C) and the ptxas resource report,
#   3. prints the environment report, 4. runs the GPU tests and tests/test_ext.py,
#   5. runs bench/run.py --check, then every family's full sweep (bench/run.py all),
#   6. runs the engine end to end (bench/run.py e2e: 13 of the 52 layers, FP8, batch 1/16/64, 1k
#      context; TWOTOWER_RT_BENCH=check: 6 layers, batch 1/16), its log appended to bench.log.
# Everything lands in $OUT (./gpu_out when OUT is unset), 8 files (the device tool returns 8 at
# most): summary.txt (GPU, step results, env report, ptxas lines), build.log, env.json,
# pytest.log, bench.log, check.json, results.json, e2e.json
# Each step runs even when an earlier one failed (except after a failed build); the exit code is 1
# when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME LOGFILE CMD...: run CMD with output to LOGFILE (and the terminal)
  local name=$1 log=$2 start rc
  shift 2
  start=$(date +%s)
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  echo "step $name: rc=$rc, $(($(date +%s) - start)) s" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

{
  echo "commit: ${TWOTOWER_RT_COMMIT:-unknown}   date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
} 2>&1 | tee "$SUMMARY"

# 1. Carried wheels.
mkdir -p /tmp/site
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed" | tee -a "$SUMMARY"; exit 1; }
else
  echo "no .whl/ carried: using the image's scikit-build-core/pybind11, no CUTLASS" | tee -a "$SUMMARY"
fi
if ! command -v nvcc >/dev/null; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$dir/nvcc" ]; then export PATH="$dir:$PATH"; break; fi
  done
fi
CUTLASS_INCLUDE_DIR=$("$PY" -c 'import importlib.util as u, os
s = u.find_spec("cutlass_library")
print(os.path.join(s.submodule_search_locations[0], "source", "include") if s else "")')
export CUTLASS_INCLUDE_DIR
echo "nvcc: $(command -v nvcc || echo missing); CUTLASS: ${CUTLASS_INCLUDE_DIR:-none}" | tee -a "$SUMMARY"

# 2. Build and install.
export TWOTOWER_RT_BUILD_CUDA=ON TWOTOWER_RT_PTXAS_VERBOSE=ON CMAKE_BUILD_PARALLEL_LEVEL=16
if ! step build "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
  --no-cache-dir --upgrade -v --target /tmp/site .; then
  tail -40 "$OUT/build.log"
  exit 1
fi
# One line per kernel: name, registers, stack/spills.
grep -E "Compiling entry|bytes spill|Used [0-9]+ registers" "$OUT/build.log" | paste - - - |
  sed -E "s/.*Compiling entry function '([^']+)'.*bytes stack frame, ([^\t]*)\t.*Used ([0-9]+) registers.*/\1: \3 registers, \2/" |
  { c++filt 2>/dev/null || cat; } | sed -E 's/^void //; s/\(twotower_rt::[A-Za-z]+Params\)//' | tee -a "$SUMMARY"

# 3. Environment report (run outside the repo so that only the installed package is importable).
(cd /tmp && "$PY" -m twotower_rt.env) 2>&1 | tee -a "$SUMMARY"
(cd /tmp && "$PY" -m twotower_rt.env --json) >"$OUT/env.json" 2>&1 || status=1

# 4. Tests: every gpu-marked test, and the extension/env tests with a GPU present.
export TWOTOWER_RT_EXPECT_EXTENSION=1
step pytest "$OUT/pytest.log" timeout 420 bash -c \
  "'$PY' -m pytest -q -rs -p no:cacheprovider -m gpu tests && \
   '$PY' -m pytest -q -rs -p no:cacheprovider tests/test_ext.py"

# 5. Benchmarks.
# TWOTOWER_RT_BENCH=check skips the full sweeps (a short device budget).
full_sweep="'$PY' bench/run.py all --out '$OUT/results.json'"
[ "${TWOTOWER_RT_BENCH:-all}" = check ] && full_sweep=true
# Time limits keep the files coming back inside the device budget even if a step hangs.
step bench "$OUT/bench.log" timeout 420 bash -c \
  "'$PY' bench/run.py --check --out '$OUT/check.json' && $full_sweep"

# 6. The engine end to end.
e2e_size="--layers 13 --batch 1 16 64"
[ "${TWOTOWER_RT_BENCH:-all}" = check ] && e2e_size="--layers 6 --batch 1 16"
step e2e "$OUT/e2e.log" timeout 300 bash -c "'$PY' bench/run.py e2e $e2e_size --weights fp8 \
  --context 1024 --new-tokens 32 --out '$OUT/e2e.json'"
cat "$OUT/e2e.log" >>"$OUT/bench.log" && rm -f "$OUT/e2e.log"

echo "gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED)" | tee -a "$SUMMARY"
exit $status
