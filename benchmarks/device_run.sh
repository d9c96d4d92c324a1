#!/usr/bin/env bash
# The one script to run on the CUDA device machine (H100), from the repo root:
#
#   run  carry [".device-mlx/device-mlx.sh", ...]   (see /work/shared/device/README.md)
#        command: source .device-mlx/device-mlx.sh && bash benchmarks/device_run.sh
#
# Stages, each under its own time limit; results are written as they come (a
# timeout keeps what was measured) and results.md is re-rendered after every stage:
#   1. python3 tests/run_sharded.py --shards $GPU_TEST_SHARDS -- -m gpu tests
#      (the GPU suite in parallel processes: on a fresh machine it is mostly NVRTC compiles)
#   2. recurrent_bench.py --compare, float32 then bfloat16     -> $OUT/mlx_float32.json, mlx_bfloat16.json
#   3. torch_baseline.py (cuDNN; PYTHONPATH without MLX)       -> $OUT/torch.json
#   4. report.py                                               -> $OUT/results.md (+ speedup.png if matplotlib)
# and, named in STAGES: ptl_torch / ptl_f32 / ptl_bf16 (mlx_fastrnn.pytorch vs cuDNN and the stock
# composition: pytorch_layers_torch.py / pytorch_layers_bench.py), flashrnn (flashrnn_bench.py) and
# flashrnn_torch (FlashRNN itself, flashrnn_torch.py, the same $FLASHRNN_GRID),
# classes / tests_classes (kernel_classes_tune.py per cell and dtype -> $OUT/classes.json and
# $OUT/class_table.py, copied into the tree for the later stages; tests_classes runs the GPU suite
# meanwhile, holding the timing lock), sweep (the 32-shape sweep, fast -> $OUT/sweep_fast.json) and
# sweep_torch (cuDNN on it), ab (env_ab.py: $AB_ENV at the two $AB_VALUES, alternating rounds, on
# $AB_LAYERS / $AB_FLASHRNN -> $OUT/ab.json; default: the tensor-core switch on the configurations of
# RESULTS.md's table). On the H200 (2026-12-02, fresh machine): tests_classes 131 s + 6 s,
# sweep 101 s, sweep_torch 89 s with BUDGET=0.2.
# Everything printed goes to $OUT/device_run.log too; $OUT/status.txt has one line
# per stage (exit code, seconds). At most 7 files in $OUT (the device tool returns 8).
# On the H100 (25 Nov 2026, fresh machine): f32 90-125 s, bf16 90-140 s (it also runs a
# float32 reference per config), torch ~30 s; the GPU suite in ONE process did not
# finish in 400 s (NVRTC compiles), in 8 shards it took 80-100 s. The limits below sum to
# 480 s; override with T_TESTS, T_F32, T_BF16, T_TORCH (seconds), BUDGET (timed
# seconds per config and impl, default 0.5), STAGES (default "tests f32 bf16 torch"),
# GPU_TEST_SHARDS (default 4).
set -u -o pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/device_run_out}
mkdir -p "$OUT"
T_TESTS=${T_TESTS:-100}
T_F32=${T_F32:-150}
T_BF16=${T_BF16:-150}
T_TORCH=${T_TORCH:-80}
T_PTL_F32=${T_PTL_F32:-240}    # pytorch_layers_bench.py: 36 configs per dtype on the GPU shapes (not yet timed)
T_PTL_BF16=${T_PTL_BF16:-240}
T_PTL_TORCH=${T_PTL_TORCH:-120}
T_CLASSES=${T_CLASSES:-200}   # classes stage (after the tests in tests_classes)
T_CLASSES_ALL=${T_CLASSES_ALL:-560}  # each tuning process, compile + wait + timing (2026-12-04, with the K-splits, beside the GPU suite: 400 s left the RNN's processes unfinished)
T_SWEEP=${T_SWEEP:-300}
T_AB=${T_AB:-300}
AB_ENV=${AB_ENV:-MLX_FASTRNN_PERSISTENT_MMA}
AB_VALUES=${AB_VALUES:-",0"}
AB_LAYERS=${AB_LAYERS:-"LSTM:128x200x512:float32,LSTM:16x1024x512:float32,GRU:64x256x256:bfloat16,GRU:256x50x256:float32,LSTM:32x40x200:float32"}
AB_FLASHRNN=${AB_FLASHRNN-"lstm:64x256:4x256:bfloat16,lstm:64x256:16x128:bfloat16,slstm:64x256:4x256:bfloat16,lstm:16x1024:4x128:float32"}
T_FLASHRNN=${T_FLASHRNN:-300}
T_FLASHRNN_BUILD=${T_FLASHRNN_BUILD:-240}
# the FlashRNN grid of the flashrnn / flashrnn_torch stages (flashrnn_bench.py's options)
FLASHRNN_GRID=${FLASHRNN_GRID:-"--batches 16 --lengths 1024"}
BUDGET=${BUDGET:-0.5}
STAGES=${STAGES:-"tests f32 bf16 torch"}
GPU_TEST_SHARDS=${GPU_TEST_SHARDS:-4}
T0=$(date +%s)
: >"$OUT/status.txt"

main() {

# MLX's CUDA build: device-mlx.sh exports PYTHONPATH=/tmp/mlx-site (idempotent once assembled).
if ! python3 -c "import mlx.core" >/dev/null 2>&1; then
  if [[ -f .device-mlx/device-mlx.sh ]]; then
    # shellcheck disable=SC1091
    source .device-mlx/device-mlx.sh || { echo "device_run: MLX is not assembled (stage both parts first)"; exit 3; }
  else
    echo "device_run: mlx is not importable and .device-mlx/device-mlx.sh was not carried"; exit 3
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# For torch: the same path without MLX's site (torch + MLX CUDA clash on cuDNN).
TORCH_PYTHONPATH=$(printf '%s' "$PYTHONPATH" | tr ':' '\n' | grep -v 'mlx-site' | paste -sd: -)

{
  echo "date: $(date -u +%FT%TZ)"
  echo "uname: $(uname -a)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info())" 2>&1
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
}
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU_NAME=${GPU_NAME:-no GPU}

# FlashRNN (pure Python; JIT-builds its kernels there) from its carried wheel, for the torch side only
install_flashrnn() {
  local whl
  whl=$(ls .device-mlx/flashrnn-*.whl 2>/dev/null | head -1)
  if [[ -n $whl ]] && ! PYTHONPATH="$TORCH_PYTHONPATH" python3 -c "import flashrnn" 2>/dev/null; then
    python3 -m pip install -q --no-deps --target /tmp/frnn-site "$whl" >/dev/null 2>&1
  fi
  [[ -d /tmp/frnn-site ]] && TORCH_PYTHONPATH="$TORCH_PYTHONPATH:/tmp/frnn-site"
  return 0
}

report() {
  python3 benchmarks/report.py "$OUT"/mlx_*.json "$OUT"/torch.json \
    --title "device_run.sh results: $GPU_NAME, $(date -u +%F)" \
    --out "$OUT/results.md" --png "$OUT/speedup.png" 2>&1 | grep -v 'does not exist'
  return 0
}

# stage NAME LIMIT CMD...: run CMD under `timeout`, record its rc and seconds, re-render the report.
stage() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== [$(( t - T0 ))s] $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  [[ $rc == 124 || $rc == 137 ]] && echo "=== $name TIMED OUT after ${dt}s (partial results kept)"
  echo "$name rc=$rc ${dt}s" | tee -a "$OUT/status.txt"
  report
  return 0
}

LOCK=/tmp/classes/lock
mkdir -p /tmp/classes
# python3 -c "$HOLD_LOCK" FILE CMD...: run CMD holding FILE's lock (fcntl; no flock(1) needed)
HOLD_LOCK='import fcntl, subprocess, sys
f = open(sys.argv[1], "a+"); fcntl.flock(f, fcntl.LOCK_EX); sys.exit(subprocess.call(sys.argv[2:]))'
CLASSES="for c in gru lstm rnn_tanh slstm; do for d in float32 bfloat16; do
  timeout -k 5 $T_CLASSES_ALL python3 benchmarks/kernel_classes_tune.py --cells \$c --dtypes \$d --lock $LOCK \
    --json /tmp/classes/\$c.\$d.json > /tmp/classes/\$c.\$d.log 2>&1 & done; done; wait"
# python3 -c "$CONCAT_JSON" OUT IN...: one results file (the first meta, every result) from several
CONCAT_JSON='import json, sys
runs = [json.load(open(p)) for p in sys.argv[2:]]
json.dump({"meta": runs[0]["meta"], "results": [r for run in runs for r in run["results"]]}, open(sys.argv[1], "w"))'
classes_table() {
  python3 benchmarks/kernel_classes_tune.py --merge /tmp/classes/*.json --json "$OUT/classes.json" \
    --write-table "$OUT/class_table.py"
  # later stages of this call select from the table just measured
  [[ -f "$OUT/class_table.py" ]] && cp "$OUT/class_table.py" mlx_fastrnn/kernels/class_table.py
  return 0
}

for s in $STAGES; do
  case $s in
    tests) stage tests "$T_TESTS" python3 tests/run_sharded.py --shards "$GPU_TEST_SHARDS" -- -m gpu tests ;;
    f32)   stage bench_float32 "$T_F32" python3 benchmarks/recurrent_bench.py --compare \
             --dtype float32 --budget "$BUDGET" --json "$OUT/mlx_float32.json" ;;
    bf16)  stage bench_bfloat16 "$T_BF16" python3 benchmarks/recurrent_bench.py --compare \
             --dtype bfloat16 --budget "$BUDGET" --json "$OUT/mlx_bfloat16.json" ;;
    torch) stage torch "$T_TORCH" env PYTHONPATH="$TORCH_PYTHONPATH" python3 benchmarks/torch_baseline.py \
             --dtype float32,bfloat16 --budget "$BUDGET" --json "$OUT/torch.json" ;;
    # mlx_fastrnn.pytorch (2-layer bidirectional LSTM/GRU) vs cuDNN and vs the stock composition
    ptl_torch) stage ptl_torch "$T_PTL_TORCH" env PYTHONPATH="$TORCH_PYTHONPATH" python3 \
             benchmarks/pytorch_layers_torch.py --dtype float32,bfloat16 --budget "$BUDGET" --json "$OUT/ptl_torch.json" ;;
    ptl_f32) stage ptl_float32 "$T_PTL_F32" python3 benchmarks/pytorch_layers_bench.py --dtype float32 \
             --budget "$BUDGET" --json "$OUT/ptl_float32.json" ;;
    ptl_bf16) stage ptl_bfloat16 "$T_PTL_BF16" python3 benchmarks/pytorch_layers_bench.py --dtype bfloat16 \
             --budget "$BUDGET" --json "$OUT/ptl_bfloat16.json" ;;
    flashrnn) stage flashrnn "$T_F32" python3 benchmarks/flashrnn_bench.py $FLASHRNN_GRID \
             --budget "$BUDGET" --json "$OUT/flashrnn.json" ;;
    # FlashRNN itself on the same grid (its wheel carried as .device-mlx/flashrnn-*.whl): its
    # kernels built in one process per core first (nvcc / Triton, ~25-35 s each; the whole grid's
    # 108 `cuda` kernels took ~4 min in 16 processes on 2026-12-04), then timed: `cuda` on the grid,
    # `triton_fused` only at FLASHRNN_TRITON_DIMS (default 64: the only D it built there)
    flashrnn_torch) install_flashrnn
             NB=$(nproc)
             stage flashrnn_builds "$T_FLASHRNN_BUILD" bash -c 'for i in $(seq 1 '"$NB"'); do
               PYTHONPATH="'"$TORCH_PYTHONPATH"'" python3 benchmarks/flashrnn_torch.py --build-only --part $i/'"$NB"' \
                 '"$FLASHRNN_GRID"' --json /tmp/frnn_build.$i.json > /tmp/frnn_build.$i.log 2>&1 & done; wait
               grep -h "s  \[\|error" /tmp/frnn_build.*.log'
             ls /tmp/frnn_build.*.json >/dev/null 2>&1 &&  # build times and errors
               python3 -c "$CONCAT_JSON" "$OUT/flashrnn_builds.json" /tmp/frnn_build.*.json
             stage flashrnn_torch "$T_FLASHRNN" env PYTHONPATH="$TORCH_PYTHONPATH" python3 benchmarks/flashrnn_torch.py \
             $FLASHRNN_GRID --backends cuda --budget "$BUDGET" --json /tmp/frnn_cuda.json
             # into $OUT at once: a call that runs out of time during the next stage keeps these
             [[ -f /tmp/frnn_cuda.json ]] && python3 -c "$CONCAT_JSON" "$OUT/flashrnn_torch.json" /tmp/frnn_cuda.json
             stage flashrnn_triton "$T_FLASHRNN" env PYTHONPATH="$TORCH_PYTHONPATH" python3 benchmarks/flashrnn_torch.py \
             $FLASHRNN_GRID --backends triton_fused --dims "${FLASHRNN_TRITON_DIMS:-64}" --budget "$BUDGET" \
             --json /tmp/frnn_triton.json
             FRNN_JSON=$(ls /tmp/frnn_cuda.json /tmp/frnn_triton.json 2>/dev/null)
             [[ -n $FRNN_JSON ]] && python3 -c "$CONCAT_JSON" "$OUT/flashrnn_torch.json" $FRNN_JSON
             # FlashRNN ÷ ours where this call (or an earlier stage) timed both
             [[ -f $OUT/flashrnn.json && -f $OUT/flashrnn_torch.json ]] && python3 benchmarks/report.py --flashrnn \
               "$OUT/flashrnn.json" "$OUT/flashrnn_torch.json" --out "$OUT/flashrnn_vs.md" ;;
    # kernel classes: tiled vs resident per (cell, dtype, B, H), one tuning process per cell and
    # dtype building its kernels in parallel (NVRTC), timing them in turns (--lock)
    classes) stage classes "$T_CLASSES" bash -c "$CLASSES" ; classes_table ;;
    # the same, while the GPU suite runs (holding the lock: nothing is timed until it is done)
    tests_classes) bash -c "$CLASSES" & CPID=$!
             stage tests "$T_TESTS" python3 -c "$HOLD_LOCK" "$LOCK" python3 tests/run_sharded.py \
               --shards "$GPU_TEST_SHARDS" -- -m gpu tests
             stage classes "$T_CLASSES" bash -c "wait $CPID 2>/dev/null; while kill -0 $CPID 2>/dev/null; do sleep 1; done"
             pkill -f kernel_classes_tune.py 2>/dev/null
             tail -n 3 /tmp/classes/*.log; classes_table ;;
    # the 32-shape sweep, fast only (one process per layer and dtype, compiling in parallel, timing
    # in turns), then cuDNN in its own process
    sweep) stage sweep "$T_SWEEP" bash -c 'for l in GRU LSTM RNN; do for d in float32 bfloat16; do
               python3 benchmarks/recurrent_bench.py --shapes sweep --layers $l --dtype $d --budget '"$BUDGET"' \
                 --lock /tmp/sweep.lock --json /tmp/sweep.$l.$d.json > /tmp/sweep.$l.$d.log 2>&1 & done; done
               wait; tail -n 2 /tmp/sweep.*.log'
           pkill -f 'recurrent_bench.py --shapes sweep' 2>/dev/null  # a timeout leaves the workers running
           python3 -c "$CONCAT_JSON" "$OUT/sweep_fast.json" /tmp/sweep.*.json ;;
    ab) stage ab "$T_AB" python3 benchmarks/env_ab.py --env "$AB_ENV" --values "$AB_VALUES" \
             --layers "$AB_LAYERS" --flashrnn "$AB_FLASHRNN" --json "$OUT/ab.json" ;;
    sweep_torch) stage sweep_torch "$T_TORCH" env PYTHONPATH="$TORCH_PYTHONPATH" python3 benchmarks/torch_baseline.py \
             --shapes sweep --dtype float32,bfloat16 --budget "$BUDGET" --json "$OUT/sweep_torch.json" ;;
    *) echo "device_run: unknown stage $s" ;;
  esac
done

echo "=== [$(( $(date +%s) - T0 ))s] done; $OUT/results.md:"
cat "$OUT/results.md" 2>/dev/null
cat "$OUT/status.txt"
}

main 2>&1 | tee -a "$OUT/device_run.log"
