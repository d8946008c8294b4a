# Sourced by .ci/run and benchmarks/gpu_check.sh: cuda_home prints the CUDA toolkit's own folder
# (the one holding bin/nvcc and lib64/), which CUDA_HOME must name: the nvcc on PATH may be a
# wrapper script elsewhere. $CUDA_HOME wins when set; fails when no nvcc is found.
cuda_home() {
  if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME"; return; fi
  local nvcc
  nvcc=$(command -v nvcc) || return 1
  # A wrapper script names the real nvcc; a symlink resolves to it.
  local real
  real=""
  if [ "$(head -c 2 "$nvcc")" = "#!" ]; then
    real=$(grep -o '/[^ "]*/bin/nvcc' "$nvcc" | head -n 1 || true)
  fi
  [ -n "$real" ] || real=$(readlink -f "$nvcc")
  dirname "$(dirname "$real")"
}
