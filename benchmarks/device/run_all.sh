#!/usr/bin/env bash
# Every GPU measurement of the project (run THERE, from the repo root, with carry [".carry/device"]
# built by benchmarks/device/prepare.sh). Each stage has its own time limit; outputs and logs are
# copied to $OUT (they come back) as they are produced. Stages (STAGES="..."), wall time measured
# on an H100 on 2026-11-23: check 4 min (mostly Triton compilation), kernels 3.5, ltsf 4.5,
# genomics 7.5; distributed and sweep about 2-3 each. A device call is limited to 10 minutes, so
# run them in three or four calls, e.g. "check kernels", then "ltsf", then "genomics". Since
# 2026-12-01 the check stage also checks the persistent tiled kernels (impl="auto" for depth 2;
# about 1.5 min more on an H200, not yet timed as part of this stage); stage "persistent"
# (kernels_persistent.py and the layer rows of the Triton kernels) took 4-5 min on an H200.
# Stages "graphpaths" (75 s on an H200, one GPU) and "shapes" (four shapes in 27 s there,
# 2026-12-02) check the tiled kernels' other paths and head shapes; stage "trace" (about 2 min
# there, 2026-12-02) traces one layer step and times the split forward.
set -uo pipefail
C=.carry/device
export PYTHONUNBUFFERED=1 TITANS_DATA_DIR=$PWD/$C/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $C/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-"check kernels"}
# at most 8 files come back: the logs plus one archive of RESULTS.md and benchmarks/results/
save() { tar czf "$OUT/results.tgz" benchmarks/RESULTS.md benchmarks/results; }
for s in $STAGES; do
  echo "=== $s $(date -u +%T)"
  case $s in
    check)    timeout 120 python3 benchmarks/backbone_check.py 2>&1 | tee "$OUT/check.log"
              timeout 420 python3 benchmarks/kernels.py --check 2>&1 | tee -a "$OUT/check.log"
              # the Triton kernels serve impl="auto" in the later stages only if their GPU check passed
              if [ "${PIPESTATUS[0]}" = 0 ]; then export TITANS_MEMORY_TRITON=1; else export TITANS_MEMORY_TRITON=0; fi
              echo "TITANS_MEMORY_TRITON=${TITANS_MEMORY_TRITON:-0}" | tee -a "$OUT/check.log" ;;
    kernels)  timeout 300 python3 benchmarks/kernels.py --out-md benchmarks/RESULTS.md 2>&1 | tee "$OUT/kernels.log" ;;
    ltsf)     timeout 480 python3 benchmarks/ltsf.py --datasets ETTh1 ETTh2 ETTm1 ETTm2 Weather \
                --horizons 96 192 336 720 --seeds 0 --data-dir "$TITANS_DATA_DIR" --resume --out-md 2>&1 | tee "$OUT/ltsf.log" ;;
    sweep)    timeout 300 python3 benchmarks/kernels.py --sweep 2>&1 | tee "$OUT/sweep.log" ;;
    persistent) timeout 330 python3 benchmarks/kernels_persistent.py ${PERSISTENT_ARGS:-} 2>&1 | tee "$OUT/persistent.log"
              timeout 270 python3 benchmarks/kernels.py --out-csv benchmarks/results/kernels_h200_tiled.csv \
                --impls ${PERSISTENT_IMPLS:-ours_triton,ours_triton_fused} 2>&1 | tee "$OUT/kernels_h200.log" ;;
    diagbwd)  timeout 150 python3 benchmarks/kernels_persistent.py --diag-bwd 2>&1 | tee "$OUT/diag_bwd.log" ;;
    trace)    # where the GPU idles in a layer step (host-side trace), and the split forward against retrieval in the walk
              timeout 120 python3 benchmarks/trace_step.py --impl ours_triton --length 8192 2>&1 | tee "$OUT/trace.log"
              timeout 150 python3 benchmarks/kernels_persistent.py --diag-split 2>&1 | tee "$OUT/split.log" ;;
    precision) # training quality per kernel_precision on a real genome, with a gradient check against fp64 (about 4 min on an H200)
              timeout 300 python3 benchmarks/precision_quality.py --data-dir "$TITANS_DATA_DIR" --grad-check \
                --seeds 0,1,2 --theta-max 0.01 2>&1 | tee "$OUT/precision.log"
              timeout 120 python3 benchmarks/kernels_persistent.py --diag-parallel 2>&1 | tee "$OUT/parallel.log" ;;
    graphpaths) # the CUDA-graph backward's eager, eviction and capture-failure paths, and the DDP check on >= 2 GPUs
              timeout 240 python3 benchmarks/device/graph_paths_check.py 2>&1 | tee "$OUT/graph_paths.log"
              if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
                timeout 150 torchrun --nproc_per_node 2 benchmarks/device/ddp_graph_check.py 2>&1 | tee "$OUT/ddp_graph.log"
              fi ;;
    shapes)   # the default configuration at every head shape impl="auto" sends to the tiled kernels, in parallel
              for s in '[[64,4,64]]' '[[64,2,64]]' '[[32,2,32]]' '[[32,4,32]]' '[[16,4,16]]'; do
                timeout 240 python3 benchmarks/kernels_persistent.py --shapes-only "$s" > "$OUT/shape_$(echo "$s" | tr -dc 0-9).log" 2>&1 &
              done
              wait; cat "$OUT"/shape_*.log | tee "$OUT/shapes.log" ;;
    tiled)    timeout 500 python3 benchmarks/kernels.py --tiled --lengths 2048,8192,32768 2>&1 | tee "$OUT/tiled.log" ;;
    distributed) # DDP over every GPU (and devices=1); Optuna workers one per GPU, at least 2 (sharing a GPU if 1)
              n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
              timeout 400 python3 benchmarks/distributed.py --devices "$n" --workers "$(( n > 2 ? n : 2 ))" \
                --data-dir "$TITANS_DATA_DIR" --out-md 2>&1 | tee "$OUT/distributed.log" ;;
    genomics) timeout 480 python3 benchmarks/genomics.py --data-dir "$TITANS_DATA_DIR" --long \
                --out-md benchmarks/RESULTS.md 2>&1 | tee "$OUT/genomics.log" ;;
  esac
  save
done
