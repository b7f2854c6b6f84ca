#!/usr/bin/env bash
# bnorm.torch on CUDA tensors, on a GPU machine: installs a bnorm wheel built elsewhere,
# runs the drop-in's CUDA tests (crates/bnorm-python/tests/test_torch_cuda.py) and, when
# given, bnorm-cuda's GPU test binary (its foreign-memory test also under compute-sanitizer),
# then bench/torch_dropin_cuda.py (torch.nn's batch norm, cuDNN, against the drop-in) and
# bench/gpu/dropin_parts.py (where one call's time goes).
# Needs an NVIDIA GPU and python3 with torch, numpy and pytest; no cargo there.
#
# Build on any machine (no CUDA needed), from the repository root:
#     (cd crates/bnorm-python && maturin build --release --skip-auditwheel -o ../../.gpu)
#     BNORM_REQUIRE_GPU=1 cargo test --release -p bnorm-cuda --test gpu --no-run   # prints the test binary
# then on the GPU machine, from the repository root:
#     bench/gpu/dropin.sh WHEEL [GPU_TEST_BINARY [RESULTS_DIR]]
# Results: RESULTS_DIR (default bench/gpu/results/dropin-<UTC time>). Exit status: 0 all
# passed, 1 a test failed, 2 nothing could run.
set -u
wheel="${1:?usage: bench/gpu/dropin.sh WHEEL [GPU_TEST_BINARY [RESULTS_DIR]]}"
tests="${2:-}"
out="${3:-bench/gpu/results/dropin-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
site="$(mktemp -d)"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" \
  || { echo "dropin.sh: cannot install $wheel" >&2; exit 2; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "wheel: $(basename "$wheel")"
  echo "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  python3 -c 'import torch, platform; print("python:", platform.python_version(), "torch:", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
} | tee "$out/machine.txt"
rc=0
BNORM_REQUIRE_GPU=1 python3 -m pytest -q -p no:cacheprovider crates/bnorm-python/tests/test_torch_cuda.py \
  2>&1 | tee "$out/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
if [ -n "$tests" ]; then
  "$tests" --test-threads=1 2>&1 | tee "$out/gpu_tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck "$tests" foreign_memory 2>&1 | tail -4 | tee "$out/memcheck.txt"
  fi
fi
python3 bench/torch_dropin_cuda.py --json "$out/dropin.json" 2>&1 | tee "$out/dropin.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
python3 bench/gpu/dropin_parts.py 2>&1 | tee "$out/parts.txt"
exit $rc
