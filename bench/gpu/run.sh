#!/usr/bin/env bash
# The one-shot GPU check of bnorm-cuda: finds libcuda and an NVRTC, verifies every kernel
# against bnorm's CPU path, runs the GPU tests, then times bnorm and cuDNN (PyTorch) side by
# side on the cuDNN anchor's cases and metric, the copy ceiling timed in the same run; one
# table. Needs an NVIDIA GPU, python3 with torch; no cargo (binaries built elsewhere).
#
# Build on any machine (no CUDA needed), from the repository root:
#     cargo build --release -p bnorm-cuda --example gpu_check
#     BNORM_REQUIRE_GPU=1 cargo test --release -p bnorm-cuda --test gpu --no-run   # prints the test binary
# then on the GPU machine, from the repository root:
#     bench/gpu/run.sh [--tests TEST_BINARY] [GPU_CHECK_BINARY] [gpu_check options...]
# (default binary: target/release/examples/gpu_check). Results go to stdout and to
# bench/gpu/results/<date>-<card>/ (machine.txt names card, driver, date, commit).
#
# NVRTC: the system's (loader path) if present, else the newest libnvrtc.so* inside the
# Python packages (torch's nvidia-cuda-nvrtc wheel), passed to the crate as BNORM_NVRTC.
# Exit status: 0 all verified, 1 a check failed, 2 nothing could run (no GPU, no libcuda,
# no NVRTC, no binary).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tests=""
if [ "${1:-}" = "--tests" ]; then tests="${2:-}"; shift 2; fi
bin="${1:-$root/target/release/examples/gpu_check}"
[ $# -gt 0 ] && shift
t0=$SECONDS

fail2() { echo "run.sh: $*; nothing verified" >&2; exit 2; }

[ -x "$bin" ] || fail2 "no gpu_check binary at $bin (build it: cargo build --release -p bnorm-cuda --example gpu_check)"

# --- the driver --------------------------------------------------------------------------
libcuda="$( (ldconfig -p 2>/dev/null || true) | awk '/libcuda\.so\.1 /{print $NF; exit}')"
if [ -z "$libcuda" ]; then
  for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/lib/wsl/lib; do
    if [ -e "$d/libcuda.so.1" ]; then libcuda="$d/libcuda.so.1"; break; fi
  done
fi
[ -n "$libcuda" ] || fail2 "no libcuda.so.1 (no NVIDIA driver on this machine)"
if ! smi="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"; then
  smi="unknown (nvidia-smi: $(echo "$smi" | head -1))"
fi
smi="$(echo "$smi" | head -1)"

# --- NVRTC: system first, then the Python packages (torch's wheel) ------------------------
nvrtc="$( (ldconfig -p 2>/dev/null || true) | awk '/libnvrtc\.so/{print $NF; exit}')"
if [ -n "$nvrtc" ]; then
  nvrtc_from="system ($nvrtc)"
elif [ -n "${BNORM_NVRTC:-}" ]; then
  nvrtc_from="BNORM_NVRTC=$BNORM_NVRTC"
else
  wheel="$(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
try:
    import torch
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
except Exception:
    pass
found = []
for r in roots:
    found += glob.glob(os.path.join(r, "nvidia", "*", "lib", "libnvrtc.so*"))
    found += glob.glob(os.path.join(r, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
found = [f for f in found if "builtins" not in os.path.basename(f)]
print(sorted(found)[-1] if found else "")
EOF
)"
  [ -n "$wheel" ] || fail2 "no NVRTC: none on the loader path and none in python3's packages (pip install nvidia-cuda-nvrtc, or set BNORM_NVRTC)"
  export BNORM_NVRTC="$wheel"
  nvrtc_from="python package ($wheel)"
fi

card="$(echo "$smi" | cut -d, -f1 | tr -c 'A-Za-z0-9\n' '-' | sed 's/--*/-/g; s/-$//')"
out="$here/results/$(date -u +%Y%m%dT%H%M%SZ)-${card:-gpu}"
mkdir -p "$out"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "card: $smi"
  echo "host: $(uname -srm); glibc $(ldd --version 2>/dev/null | head -1 | awk '{print $NF}')"
  echo "libcuda: $libcuda"
  echo "nvrtc: $nvrtc_from"
  python3 -c 'import torch; print(f"torch: {torch.__version__} CUDA {torch.version.cuda} cuDNN {torch.backends.cudnn.version()}")' 2>/dev/null || echo "torch: not importable"
} | tee "$out/machine.txt"

rc=0
if [ -n "$tests" ]; then
  echo "== GPU tests: $tests --include-ignored"
  BNORM_REQUIRE_GPU=1 timeout 60 "$tests" --include-ignored 2>&1 | tee "$out/tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi

echo "== gpu_check: verification, then timing"
timeout 150 "$bin" --json "$out/bnorm.json" "$@" 2>&1 | tee "$out/gpu_check.txt"
grc=${PIPESTATUS[0]}
if [ "$grc" -eq 2 ]; then echo "gpu_check: CUDA unavailable, nothing verified"; exit 2; fi
[ "$grc" -eq 0 ] || rc=1

echo "== cuDNN through PyTorch, side by side"
timeout 90 python3 "$here/torch_cudnn.py" --bnorm "$out/bnorm.json" --json "$out/torch.json" 2>&1 | tee "$out/table.txt"
echo "run.sh: gpu_check exit $grc, tests $( [ -n "$tests" ] && echo run || echo 'not given'), overall $rc (0 = every check passed) in $((SECONDS - t0)) s; results in $out"
exit "$rc"
