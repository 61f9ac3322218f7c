#!/usr/bin/env bash
# Every GPU check in one call of at most 8 minutes (run it when a session is lent a GPU; CI never
# runs it). Prints the figures; record them in benchmarks/RESULTS.md with the date and the device.
#   bash benchmarks/gpu_checks.sh            # on the GPU machine, in the repository root
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu_checks.sh   # the same script in seconds on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gflows-gpu}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then M32=0.05; M64=0.05; STEPS=3; ESS=256; else M32=3; M64=2; STEPS=100000; ESS=16384; fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# 1. Lattice samplers at L=32 and L=64 (the recommended sampler, batch 256; HMC reference off: on the
#    CPU side it would take longer than the budget). The report prints ESS/N, log Z, MH, costs.
for spec in "L32 $M32" "L64 $M64"; do
  set -- $spec
  CI=true WANDB_MODE=disabled timeout 330 $PY train.py data=phi4 data.preset=$1 device=$DEVICE \
    trainer.batch_size=256 trainer.steps=$STEPS trainer.max_minutes=$2 data.ess_samples=$ESS \
    data.hmc.enabled=false wandb.mode=disabled resume=false run_dir="$OUT/$1" 2>&1 | grep -E "ESS/N|log Z|MH|seconds per|reached|error"
done

# 2. One training step of the CIFAR coupling model on the GPU, orbit basis against escnn's.
CI=true timeout 90 $PY benchmarks/bench_conv_basis.py --groups flip d4 --hidden 128 --batch 64 \
  --device $DEVICE --steps $([ "${SMOKE:-0}" = 1 ] && echo 2 || echo 20) 2>&1 | tail -6
