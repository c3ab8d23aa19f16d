#!/usr/bin/env bash
# The GPU figures of the README in one go (about 6 minutes on one H100/H200, compilation included):
#
#     bash experiments/gpu_benchmarks.sh OUT_DIR [PYTHON]
#
# Writes OUT_DIR/{versions.txt, bench_mfu_gpu.json, bench_activation_gpu.json,
# bench_sample_gpu.json} and a log per benchmark. Each benchmark has its own time limit, so one
# that fails or hangs does not cost the others. PYTHON defaults to python3 (a CUDA build of JAX,
# e.g. `pip install -U "jax[cuda13]"`, and the package's requirements).
set -u
out=${1:?usage: gpu_benchmarks.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c 'import jax, jaxlib, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__); print(jax.devices())'
} >"$out/versions.txt" 2>&1
cat "$out/versions.txt"

run() {  # run NAME LIMIT_S ARGS...: one benchmark, its log beside its JSON
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" $py "experiments/$name.py" --out="$out/${name}_gpu.json" "$@" \
      >"$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s"
  tail -n 3 "$out/$name.log"
}

# GPT-2 small shape, bfloat16, 32 x 1024, cuDNN attention where it lowers; dense and RA a = 0.5.
run bench_mfu 130
# The sampler: dense, fixed widths and per-token draws at batch 1, and the full re-run.
run bench_sample 110 --repeats=5 --batches=1
# The :gpu model at its recipe's batch (64 x 256), nested mlp+heads, train and decode
# (compilation dominates here: about 15-30 s per train program on an H100).
run bench_activation 150 --batch_size=64 --sites="mlp,heads" --structures=nested \
    --fractions=1,0.5 --train_steps=10
