#!/usr/bin/env bash
# Every GPU check in one call of at most 8 minutes (run it when a session is lent a GPU; CI never
# runs it). Prints the figures; record them in benchmarks/RESULTS.md with the date and the device.
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, in the repository root
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu_check.sh   # every step in a few minutes on a CPU (gloo)
# The CIFAR parts need the subset: DATA (default ../shared/data/cifar10-subset, else
# .gpu-data/cifar10-subset, a copy the device tool can carry: cp -r ../shared/data/cifar10-subset .gpu-data/).
set -uo pipefail
set -f  # no globbing: Hydra's list values ([[3,1,3],...]) look like glob patterns
cd "$(dirname "$0")/.."
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gflows-gpu}
mkdir -p "$OUT"
DATA=${DATA:-../shared/data/cifar10-subset}
[ -d "$DATA/cifar-10-batches-py" ] || DATA=.gpu-data/cifar10-subset
if [ "${SMOKE:-0}" = 1 ]; then
  M32=0.05; M64=0.05; LSTEPS=3; ESS=256; ISTEPS=3; TSTEPS=2; BATCH=8
else
  M32=2; M64=1.5; LSTEPS=100000; ESS=16384; ISTEPS=200; TSTEPS=10; BATCH=64
fi
T0=$SECONDS
stamp() { echo "# [$((SECONDS - T0)) s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
RUN="env CI=true WANDB_MODE=disabled"
COMMON="wandb.mode=disabled resume=false device=$DEVICE"

# 1. Lattice samplers at L=32 and L=64 (the recommended sampler, batch 256; HMC reference off: it
#    would take longer than the budget). The report prints ESS/N, log Z, MH and the costs.
for spec in "L32 $M32" "L64 $M64"; do
  set -- $spec
  stamp "lattice $1, $2 minutes"
  $RUN timeout 300 $PY train.py data=phi4 data.preset=$1 trainer.batch_size=256 trainer.steps=$LSTEPS \
    trainer.max_minutes=$2 trainer.schedule_clock=time data.ess_samples=$ESS data.hmc.enabled=false \
    $COMMON run_dir="$OUT/$1" 2>&1 | grep -E "ESS/N|log Z|MH|seconds per|steps in|rror"
done

if [ ! -d "$DATA/cifar-10-batches-py" ]; then
  echo "no CIFAR-10 subset at $DATA: the image checks are skipped (see the header for DATA)"
  exit 0
fi
IMG="data=cifar10 data.root=$DATA data.verify=false data.download=false group=d4 flow.hidden_channels=128"
IMG="$IMG flow.n_scales=3 flow.blocks_per_scale=4 trainer.batch_size=$BATCH trainer.eval_batch_size=256"
FLAGSHIP="flow=g_residual flow.squeeze_first=true flow.invconv=true flow.fc_blocks=0 flow.block.basis=auto"
FLAGSHIP="$FLAGSHIP flow.block.memory_saving=false flow.block.lipschitz_kwargs.train_iters=1"
# the best coupling model (README): SiLU conditioners, 1x1 output convolutions at the coarse scales,
# 3, 6 and 6 blocks at the three scales
COUPLING="flow=g_coupling flow.block.activation=silu flow.scale_kernel_sizes=[[3,1,3],[3,1,1],[3,1,1]]"
COUPLING="$COUPLING flow.blocks_per_scale=[3,6,6]"

# 2. One batch's density on the device against the CPU, same weights.
stamp "log p on $DEVICE against the CPU"
CI=true timeout 120 $PY benchmarks/bench_cifar.py check --device $DEVICE --group d4 --hidden 128 \
  --scales 3 --blocks 4 --data "$DATA" 2>&1 | grep -E "against|rror"

# 3. Seconds per step and images per second: the flagship, the best coupling model, normflows' Glow
#    and residual flow, interleaved on the device.
stamp "training steps on $DEVICE"
CI=true timeout 180 $PY benchmarks/bench_cifar.py steps --device $DEVICE --group d4 --hidden 128 \
  --scales 3 --blocks 4 --batch $BATCH --steps $TSTEPS --data "$DATA" 2>&1 | grep -E "^# $DEVICE|s/step|rror"

# 4. The flagship and the best coupling model trained a few hundred steps through train.py.
for spec in "g_residual|$FLAGSHIP" "g_coupling|$COUPLING"; do
  name=${spec%%|*}; flow=${spec#*|}
  stamp "train.py $name, $ISTEPS steps"
  $RUN timeout 150 $PY train.py $IMG $flow trainer.steps=$ISTEPS trainer.ckpt_every=$ISTEPS \
    trainer.eval_orbit=false trainer.log_every=50 data.limit_test=512 sample.n=16 $COMMON \
    run_dir="$OUT/img_$name" 2>&1 | grep -E "test_bpd|step $ISTEPS|rror" | tail -3
done

# 5. The data-parallel path: torchrun with one process (NCCL on a GPU, gloo on the CPU).
stamp "torchrun, 1 process"
$RUN timeout 120 $PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py $IMG flow=g_coupling \
  trainer.steps=$((ISTEPS / 4 + 1)) trainer.eval_at_end=false $COMMON run_dir="$OUT/torchrun" 2>&1 \
  | grep -E "backend|step|rror" | tail -3

# 6. The CIFAR coupling model's step, orbit basis against escnn's, on the device.
stamp "conv basis"
CI=true timeout 90 $PY benchmarks/bench_conv_basis.py --groups flip d4 --hidden 128 --batch 64 \
  --device $DEVICE --steps $([ "${SMOKE:-0}" = 1 ] && echo 2 || echo 20) 2>&1 | tail -6
stamp "done"
