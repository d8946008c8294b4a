#!/usr/bin/env bash
# The GPU check: every GPU question in one command, offline, in under 8 minutes on 16 cores.
#
#   benchmarks/gpu_check.sh OUTDIR             on a machine with an NVIDIA GPU, from a clean checkout
#   benchmarks/gpu_check.sh --dry-run OUTDIR   on a CPU machine: every step that needs no GPU
#
# Steps, each under its own time limit (`timeout`), so that a hang costs only its own step; a step
# that fails or times out does not stop the later ones:
#   env     the Python, torch, CUDA toolkit and GPU at hand
#   arch    TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability(): this GPU's architecture only
#           (--dry-run with no GPU: falls back to the default archs, and says so)
#   build   python3 setup.py build_ext --inplace, FORCE_CUDA=1, MAX_JOBS=$(nproc), no network needed;
#           then build_info() must report the CUDA path for that architecture
#           (--dry-run: without FORCE_CUDA, reusing the objects of an earlier build where they match)
#   tests   python3 -m pytest tests -m cuda, JUnit XML; faulthandler_timeout prints the stacks of a
#           test that runs over TEST_TIMEOUT_S, the step's limit stops it (SIGINT first, so the XML
#           is still written)
#   bench   python3 -m convt_ext.bench.gpu under a time budget: conv2d, conv_transpose2d, im2col and
#           col2im against cuDNN and torch's im2col kernels, TF32 off and on, the fp32 GEMM peak and
#           the copy bandwidths (--dry-run: two tiny shapes on the CPU)
# Writes to OUTDIR: gpu_check.log (everything printed), tests.xml (JUnit), bench.json, the charts
# bench-tf32-{off,on}.png and -cases.png, and summary.txt, which is also printed last.
# Exit status: 0 when every step passed. Limits can be changed: BUILD_S=300 benchmarks/gpu_check.sh OUTDIR.
set -uo pipefail

usage() { echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; }
DRY_RUN=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "unknown option: $arg" >&2; usage ;;
    *) [ -z "$OUTDIR" ] || usage; OUTDIR=$arg ;;
  esac
done
[ -n "$OUTDIR" ] || usage

# Seconds per step: together under 8 minutes, with room for Python's start-up between them.
ENV_S=${ENV_S:-20} ARCH_S=${ARCH_S:-30} BUILD_S=${BUILD_S:-180} TESTS_S=${TESTS_S:-120} BENCH_S=${BENCH_S:-90}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-50}  # the cases' share of the bench step (the ceilings and charts take the rest)
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-60}
if [ "$DRY_RUN" = 1 ]; then
  # A dry run is not held to the 8 minutes: a loaded 2-core CI machine gets three times as long.
  ENV_S=$((ENV_S * 3)) ARCH_S=$((ARCH_S * 3)) BUILD_S=$((BUILD_S * 3)) TESTS_S=$((TESTS_S * 3)) BENCH_S=$((BENCH_S * 3))
fi
PYTHON=${PYTHON:-python3}

mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
LOG=$OUTDIR/gpu_check.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
# shellcheck source=../.ci/cuda_home.sh
source .ci/cuda_home.sh

NAMES=() RESULTS=() TIMES=() NOTES=()
STARTED=$SECONDS

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (SIGINT at the limit, SIGKILL 15 s
# later) and records passed / FAILED (exit status) / TIMED OUT, with the seconds it took.
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo
  echo "=== $name (limit ${limit} s) $(date +%T) ==="
  timeout -s INT -k 15 "$limit" "$@"
  rc=$?
  local result=passed
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then result="TIMED OUT"; elif [ "$rc" != 0 ]; then result="FAILED ($rc)"; fi
  NAMES+=("$name") RESULTS+=("$result") TIMES+=("$((SECONDS - t0))") NOTES+=("")
  echo "=== $name: $result in $((SECONDS - t0)) s ==="
  return "$rc"
}

# --- env
env_info() {
  if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    echo "checkout $commit$(git diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
  else
    echo "checkout: not a git checkout"
  fi
  echo "host $(hostname), $(nproc) cores, dry run: $DRY_RUN"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| torch CUDA', torch.version.cuda, '| GPU visible:', torch.cuda.is_available())" || return 1
  if home=$(cuda_home); then echo "CUDA_HOME=$home: $("$home/bin/nvcc" --version | tail -n 2 | head -n 1)"; else echo "no nvcc found"; fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  return 0
}
export PYTHON DRY_RUN
export -f cuda_home env_info
step env "$ENV_S" bash -c env_info

# --- arch: this GPU's compute capability, e.g. 9.0 on an H100/H200.
ARCH=""
arch_of_gpu() {
  "$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null
}
t0=$SECONDS
echo
echo "=== arch (limit ${ARCH_S} s) $(date +%T) ==="
export -f arch_of_gpu
ARCH=$(timeout -s INT -k 15 "$ARCH_S" bash -c arch_of_gpu)
rc=$?
if [ "$rc" = 0 ] && [[ "$ARCH" =~ ^[0-9]+\.[0-9]+$ ]]; then
  result=passed note="TORCH_CUDA_ARCH_LIST=$ARCH"
elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  ARCH="" result="TIMED OUT" note="torch.cuda.get_device_capability() did not answer"
elif [ "$DRY_RUN" = 1 ]; then
  ARCH="" result=passed note="no GPU visible: fell back to the build's default architectures"
else
  ARCH="" result="FAILED" note="no GPU visible to torch"
fi
echo "$note"
NAMES+=(arch) RESULTS+=("$result") TIMES+=("$((SECONDS - t0))") NOTES+=("$note")
echo "=== arch: $result in $((SECONDS - t0)) s ==="

# --- build, in place (tests and bench import convt_ext from the checkout): no pip, no network.
build() {
  local home
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if home=$(cuda_home); then export CUDA_HOME=$home; fi
  if [ -n "$ARCH" ]; then export TORCH_CUDA_ARCH_LIST=$ARCH; fi
  if [ "$DRY_RUN" = 1 ]; then unset FORCE_CUDA; else export FORCE_CUDA=1; fi
  echo "MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-(default)} FORCE_CUDA=${FORCE_CUDA:-0}"
  "$PYTHON" setup.py -q build_ext --inplace || return 1
  # What was built: the CUDA path for this GPU (a CPU-only build is what a dry run without a GPU checks).
  "$PYTHON" -c "
import sys, convt_ext
info = convt_ext.build_info()
print({k: info[k] for k in ('version', 'torch', 'cuda', 'cuda_sass', 'cuda_ptx') if k in info})
arch, dry = sys.argv[1], sys.argv[2] == '1'
if not dry and not info['cuda']:
    sys.exit('the CUDA path was not built')
if arch and info['cuda'] and 'sm_' + arch.replace('.', '') not in info['cuda_sass']:
    sys.exit(f'no SASS for sm_{arch} in the build')
" "$ARCH" "$DRY_RUN"
}
export ARCH
export -f build
step build "$BUILD_S" bash -c build

# --- tests: the CUDA ones (on a CPU machine they are collected and skipped).
step tests "$TESTS_S" "$PYTHON" -m pytest tests -m cuda -q -rfE -p no:cacheprovider \
  -o faulthandler_timeout="$TEST_TIMEOUT_S" --junitxml="$OUTDIR/tests.xml"
# The counts, from the XML (also when the step was stopped: pytest writes it on SIGINT).
counts=$("$PYTHON" - "$OUTDIR/tests.xml" "$DRY_RUN" <<'PY' 2>&1
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as exc:
    print(f"no JUnit XML ({exc.__class__.__name__})")
    sys.exit(1)
s = root if root.tag == "testsuite" else root.find("testsuite")
n, fail, err, skip = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{n - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped of {n}")
# On a GPU, CUDA tests that all skip mean the GPU was not used: that is a failure, not a pass.
sys.exit(1 if n == 0 or (sys.argv[2] != "1" and skip == n) else 0)
PY
)
counts_rc=$?
NOTES[-1]=$counts
if [ "$counts_rc" != 0 ] && [ "${RESULTS[-1]}" = passed ]; then RESULTS[-1]="FAILED (counts)"; fi

# --- bench
if [ "$DRY_RUN" = 1 ]; then bench_args=(--device cpu --smoke); else bench_args=(); fi
step bench "$BENCH_S" env PYTHONUNBUFFERED=1 "$PYTHON" -m convt_ext.bench.gpu --out "$OUTDIR" \
  --budget "$BENCH_BUDGET_S" "${bench_args[@]}"
NOTES[-1]=$(grep -a '^bench: ' "$LOG" | tail -n 1 | cut -c 8-)

# --- summary, last
{
  echo
  echo "=== GPU check summary$([ "$DRY_RUN" = 1 ] && echo ' (dry run)'): $((SECONDS - STARTED)) s ==="
  failed=0
  for i in "${!NAMES[@]}"; do
    printf '%-6s %-16s %4s s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}" "${NOTES[$i]}"
    [ "${RESULTS[$i]}" = passed ] || failed=$((failed + 1))
  done
  echo "files in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
  if [ "$failed" = 0 ]; then echo "all ${#NAMES[@]} steps passed"; else echo "$failed of ${#NAMES[@]} steps did not pass"; fi
} | tee "$OUTDIR/summary.txt"
ok=1
grep -q "steps passed$" "$OUTDIR/summary.txt" && ok=0
exec >&- 2>&-
wait "$TEE_PID"  # for tee, so that the log is complete when the script returns
exit "$ok"
