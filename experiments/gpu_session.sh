#!/usr/bin/env bash
# One lent GPU, one call: what this project measures there, in priority order.
#
#     bash experiments/gpu_session.sh OUT_DIR [SWEEP_DEADLINE_S] [PYTHON]
#
#   1. the capacity experiment (experiments/capacity_gpu.sh) for SWEEP_DEADLINE_S seconds
#      (default 420): needs data/sotu (`make corpus`, 5 MB) copied along;
#   2. the MFU check: experiments/bench_mfu.py (GPT-2 small, bfloat16, dense and RA a = 0.5),
#      120 s at most.
# Python packages the GPU image lacks (ml-collections, tensorboardX) travel as wheels in .whl/
# (README of the device tool; `pip download --no-deps ... -d .whl ml-collections tensorboardX`)
# and are installed into /tmp/site first. Everything lands in OUT_DIR, with versions.txt.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [SWEEP_DEADLINE_S] [PYTHON]}
deadline=${2:-420}
py=${3:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo 'pip failed'; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
  nproc
} >"$out/versions.txt" 2>&1
cat "$out/versions.txt"
bash experiments/capacity_gpu.sh "$out" "$deadline" "$py"
start=$SECONDS
timeout 120 $py experiments/bench_mfu.py --rounds=3 --out="$out/bench_mfu_gpu.json" \
    >"$out/bench_mfu.log" 2>&1
echo "bench_mfu: exit $? after $((SECONDS - start)) s"
tail -n 5 "$out/bench_mfu.log"
