#!/usr/bin/env bash
# Build the carry folder for the GPU machine of the device tool (run HERE, from the repo root).
# The GPU machine has no network and no ../shared: this copies the real data and downloads the
# wheels it lacks (pyfaidx for FASTA; titans-pytorch 0.5.5 and its missing dependencies, the
# benchmark-only peer of benchmarks/kernels.py). Result: .carry/device (git-ignored, ~15 MiB).
# Then call the device tool with carry [".carry/device"] and `bash benchmarks/device/run_all.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${TITANS_DATA_DIR:-../shared/data}
OUT=.carry/device
rm -rf "$OUT" && mkdir -p "$OUT/data" "$OUT/whl"
cp -r "$DATA/ETT-small" "$DATA/weather" "$DATA/GUE" "$DATA/fasta" "$OUT/data/"
rm -f "$OUT"/data/fasta/*.fai
chmod -R u+w "$OUT/data"
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT/whl" "$@"
}
dl pyfaidx==0.9.2.2 optuna==5.0.0 optuna-integration==5.0.0 sqlalchemy==2.1.9 alembic==1.20.1 colorlog==6.12.0 mako==1.4.3
dl titans-pytorch==0.5.5 accelerated-scan==0.3.1 assoc-scan==0.0.6 axial-positional-embedding==0.3.12 \
   einx==0.4.3 frozendict==2.5.1 hyper-connections==0.4.11 loguru==0.7.3 pyvers==0.2.3 \
   rotary-embedding-torch==0.9.1 tensordict==0.15.3 torch-einops-utils==0.2.0 x-transformers==2.31.10
du -sh "$OUT"
