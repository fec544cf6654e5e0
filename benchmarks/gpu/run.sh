#!/usr/bin/env bash
# Issue 14 on a GPU machine in one call: gradclip beside the machine's own torch, the CUDA tests,
# the GPU benchmark; every result in one folder.
#
#   bash benchmarks/gpu/run.sh [--quick] [--no-install] [--full-suite] [RESULTS_DIR] [-- BENCH_ARGS...]
#
#   RESULTS_DIR   default: $OUT (the folder the device tool brings back), else
#                 benchmarks/results/gpu-YYYY-MM-DD
#   --quick       shorter budgets and repetitions (at most about 5 minutes)
#   --no-install  no pip: gradclip from src/ through PYTHONPATH (what a CPU run here uses)
#   --full-suite  also the whole test suite (minutes more; off by default)
#   BENCH_ARGS    passed to benchmarks/bench_gpu.py, e.g. -- --sets gpt2 llama8b-bf16
#
# Budgets in seconds (environment overrides): TEST_BUDGET=150 and BENCH_BUDGET=270 (quick: 100
# and 150); the benchmark starts no new gradient set once its budget is spent and is stopped
# 60 s after it. So the whole run ends within about 8.5 minutes of wall time at worst (give the
# call a 600 s limit), on an H200 with torch 2.11, CUDA 13 and no network: nothing is
# downloaded (pip runs with --no-index --no-deps).
#
# Without CUDA the same script runs end to end: the CUDA tests skip, and the benchmark runs a
# CPU smoke on toy sets, labelled "CPU smoke run, not a GPU figure".
#
# Files (at most 8 in one folder: what the device tool brings back): run.log, summary.txt,
# tests.txt, tests.json, junit.xml, bench_gpu.txt, bench_gpu.json.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
QUICK=0 INSTALL=1 FULL=0 RESULTS="" BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --no-install) INSTALL=0 ;;
    --full-suite) FULL=1 ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) RESULTS=$1 ;;
  esac
  shift
done
RESULTS=${RESULTS:-${OUT:-$ROOT/benchmarks/results/gpu-$(date +%F)}}
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
if [ $QUICK = 1 ]; then TEST_BUDGET=${TEST_BUDGET:-100} BENCH_BUDGET=${BENCH_BUDGET:-150}
else TEST_BUDGET=${TEST_BUDGET:-150} BENCH_BUDGET=${BENCH_BUDGET:-270}; fi
export PYTHONUNBUFFERED=1
exec > >(tee "$RESULTS/run.log") 2>&1
TEE=$!
START=$(date +%s)
section() { echo; echo "== $1 (t=$(( $(date +%s) - START )) s)"; }
SUMMARY=$RESULTS/summary.txt

section "environment"
$PY - <<'EOF' | tee "$SUMMARY"
import platform, sys
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}), {platform.machine()}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("no CUDA device: CPU smoke run, not a GPU figure")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
  --format=csv | tee -a "$SUMMARY"
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")

section "install gradclip (torch untouched)"
MODE=pythonpath
if [ $INSTALL = 1 ] && timeout 120 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
  MODE=pip
else
  [ $INSTALL = 1 ] && echo "pip install -e . failed offline (its build backend, hatchling, is not installed): using PYTHONPATH=src"
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
WHERE=$($PY -c "import gradclip; print(gradclip.__file__)") || { echo "gradclip does not import"; exit 1; }
case $WHERE in "$ROOT"/src/*) ;; *) echo "gradclip imports from $WHERE, not this tree's src/"; exit 1 ;; esac
echo "gradclip ($MODE) from $WHERE" | tee -a "$SUMMARY"

section "CUDA tests (budget ${TEST_BUDGET} s)"
# the device-parametrised halves (ids ending in -cuda) and test_cuda.py; modules whose
# imports are missing here are left out, and the summary says so
FILES=(tests/test_cuda.py tests/test_functional.py tests/clippers/test_fold.py tests/clippers/test_amp.py)
NOTES=()
for dep in pytest hypothesis numpy; do
  if ! $PY -c "import $dep" 2>/dev/null; then
    NOTES+=("--note" "$dep is not installed here")
    [ $dep = pytest ] && continue
    KEEP=()
    for f in "${FILES[@]}"; do
      if grep -qE "^(import|from) $dep" "$f"; then NOTES+=("--note" "left out $f: it imports $dep"); else KEEP+=("$f"); fi
    done
    FILES=("${KEEP[@]}")
  fi
done
PYTEST_ARGS=(-q -rs -p no:cacheprovider --junitxml="$RESULTS/junit.xml" -o junit_family=xunit1)
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout=120)
if $PY -c "import pytest" 2>/dev/null; then
  # SIGINT at the budget: pytest stops like on Ctrl-C and still writes junit.xml
  timeout -s INT -k 20 "$TEST_BUDGET" $PY -m pytest "${PYTEST_ARGS[@]}" -k cuda "${FILES[@]}" 2>&1 | tail -n 60
  RC=${PIPESTATUS[0]}
  [ "$RC" = 124 ] && NOTES+=("--note" "stopped by the ${TEST_BUDGET} s budget: the counts cover the tests that finished")
else
  RC=none
fi
LABEL="CUDA tests ($([ "$CUDA" = 1 ] && echo "on the GPU" || echo "no CUDA here: they skip; not a GPU result"), pytest exit $RC)"
section "test counts"
$PY benchmarks/gpu/tests_summary.py \
  "$RESULTS/junit.xml" "$RESULTS" --label "$LABEL" "${NOTES[@]}" | tee -a "$SUMMARY"

if [ $FULL = 1 ]; then
  section "the whole suite"
  timeout 900 $PY -m pytest -q -x -p no:cacheprovider 2>&1 | tail -n 30 | tee -a "$SUMMARY"
fi

section "GPU benchmark (budget ${BENCH_BUDGET} s)"
EXTRA=()
[ $QUICK = 1 ] && EXTRA+=(--quick)
[ "$CUDA" = 1 ] || EXTRA+=(--reps 3 --step-reps 2)  # the CPU smoke: toy sets, few repetitions
timeout -s INT -k 20 $(( ${BENCH_BUDGET%.*} + 60 )) env PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}" \
  $PY benchmarks/bench_gpu.py --out "$RESULTS" --budget-s "$BENCH_BUDGET" "${EXTRA[@]}" \
  "${BENCH_ARGS[@]}" 2> >(grep -v "^W[0-9]" >&2)  # torch's own warning lines left out
BRC=$?
[ $BRC = 0 ] || echo "bench_gpu.py exit $BRC$([ $BRC = 124 ] && echo ' (stopped by the time limit; bench_gpu.txt has the sets that finished)')"

section "summary"
{
  echo
  echo "benchmark (bench_gpu.txt; exit $BRC):"
  if [ -f "$RESULTS/bench_gpu.txt" ]; then
    grep -E "^(CPU SMOKE|gradclip GPU|copy bandwidth|  \[|  skipped)" "$RESULTS/bench_gpu.txt"
  else
    echo "  no bench_gpu.txt: the benchmark measured no set"
  fi
  echo
  echo "wall time $(( $(date +%s) - START )) s; files in $RESULTS:"
  ls "$RESULTS"
} | tee -a "$SUMMARY"
exec >&- 2>&-
wait "$TEE" 2>/dev/null
[ "$RC" = 0 ] && [ "$BRC" = 0 ]  # the exit status: tests and benchmark both ran clean
