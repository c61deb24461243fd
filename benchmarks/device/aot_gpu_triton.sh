#!/usr/bin/env bash
# Compiler report of the tiled / persistent kernels with the GPU machine's Triton (run HERE, no
# GPU): shared memory and spills differ between Triton versions (the 4-tile backward needed
# 288 KB with Triton 3.6 but 224 KB with 3.9), so a kernel is known to fit the GPU machine's
# blocks only when compiled by its version. Installs that Triton into a private folder (not over
# the project's), then runs `benchmarks/kernels.py --aot-tiled` with it first on the path.
# Usage: bash benchmarks/device/aot_gpu_triton.sh [TRITON_VERSION]   (default 3.6.0)
set -euo pipefail
cd "$(dirname "$0")/../.."
V=${1:-3.6.0}
DIR=${TMPDIR:-/tmp}/triton-$V
if [ ! -d "$DIR/triton" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: "triton==$V" -d "$DIR.whl"
  python3 -m pip install -q --no-deps --target "$DIR" "$DIR".whl/triton-"$V"-*.whl
fi
PYTHONPATH="$DIR" python3 benchmarks/kernels.py --aot-tiled
