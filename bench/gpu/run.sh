#!/usr/bin/env bash
# The prepared GPU check of bnorm-cuda, in one run: verification of every kernel against
# bnorm's CPU path, then bnorm and PyTorch timed side by side, one table.
#
# Build here (any machine, no CUDA needed):
#     cargo build --release -p bnorm-cuda --examples
# then on the GPU machine, from the repository root:
#     bench/gpu/run.sh [path/to/gpu_check]        (default target/release/examples/gpu_check)
# Output goes to stdout and to bench/gpu/out-<date>/.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../../target/release/examples/gpu_check}"
out="$here/out-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/card: /'
  echo "host: $(uname -srm)"
} | tee "$out/machine.txt"
"$bin" --json "$out/bnorm.json" "${@:2}" 2>&1 | tee "$out/gpu_check.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 2 ]; then echo "gpu_check: CUDA unavailable, nothing verified"; exit 2; fi
python3 "$here/torch_cudnn.py" --bnorm "$out/bnorm.json" --json "$out/torch.json" 2>&1 | tee "$out/table.txt"
echo "gpu_check exit status: $rc (0 = every check passed); results in $out"
exit "$rc"
