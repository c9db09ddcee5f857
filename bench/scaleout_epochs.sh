#!/usr/bin/env bash
# Wall time per epoch of `sparse_unet` on `streets` (1,000 train / 200 val scenes, 64x128) with one
# process and with several (torchrun), and with --amp; each configuration trains 2 epochs, the
# configurations alternate over ROUNDS rounds (a shared machine drifts), and the 1-minute load
# average is logged before and after each run. Per-epoch times are in each run's metrics.json
# (`epochs[i].train_time_s`: training steps; `time_s`: training + evaluation).
#
#   bash bench/scaleout_epochs.sh OUTDIR [DEVICE] [ROUNDS]     # TWO_THREADS=1: also 1 process x 2 threads
#
# CPU (DEVICE=cpu): 2 gloo processes x 1 thread (batch 8 each: global batch 16, the same steps as
# one process with batch 16), 1 process x 1 thread, the same with --amp bf16, 1 process x 2 threads.
# CUDA (DEVICE=cuda): 1 process with --amp off / bf16 / fp16 (batch 16), and, when the machine
# has several GPUs, NGPU NCCL processes (batch 16 each).
# Summary: python bench/scaleout_summary.py OUTDIR
set -u
OUT=${1:?output folder}
DEVICE=${2:-cpu}
ROUNDS=${3:-2}
PY=${PYTHON:-python}
mkdir -p "$OUT"
run() {  # name, then the command
  local name=$1; shift
  echo "== $name start $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/log.txt"
  "$@" > "$OUT/$name.out" 2>&1
  echo "== $name end $(date +%T) exit $? load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/log.txt"
}
COMMON="train sparse_unet --data streets --epochs 2 --no-progress --num-predictions 0 --device $DEVICE"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
for r in $(seq 1 "$ROUNDS"); do
  if [ "$DEVICE" = cpu ]; then
    run r${r}_2p1t env OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc-per-node 2 \
      -m spconv2d.zoo.cli $COMMON --threads 1 --batch-size 8 --out "$OUT/r${r}_2p1t"
    run r${r}_1p1t $PY -m spconv2d.zoo.cli $COMMON --threads 1 --batch-size 16 --out "$OUT/r${r}_1p1t"
    run r${r}_1p1t_bf16 $PY -m spconv2d.zoo.cli $COMMON --threads 1 --batch-size 16 --amp bf16 \
      --out "$OUT/r${r}_1p1t_bf16"
    [ -n "${TWO_THREADS:-}" ] && run r${r}_1p2t $PY -m spconv2d.zoo.cli $COMMON --threads 2 --batch-size 16 \
      --out "$OUT/r${r}_1p2t"
  else
    for amp in off bf16 fp16; do
      run r${r}_1gpu_$amp $PY -m spconv2d.zoo.cli $COMMON --batch-size 16 --amp $amp --out "$OUT/r${r}_1gpu_$amp"
    done
    if [ "$NGPU" -gt 1 ]; then
      run r${r}_${NGPU}gpu $PY -m torch.distributed.run --standalone --nproc-per-node "$NGPU" \
        -m spconv2d.zoo.cli $COMMON --batch-size 16 --out "$OUT/r${r}_${NGPU}gpu"
    fi
  fi
done
echo DONE >> "$OUT/log.txt"
