#!/usr/bin/env bash
# The GPU figures of the README in one go (about 10 minutes on one H100/H200, compilation included):
#
#     bash experiments/gpu_benchmarks.sh OUT_DIR [PYTHON] [RA_RUN]
#
# Writes OUT_DIR/{versions.txt, bench_mfu_gpu.json, profile_step_gpu.json,
# probe_step_variants_gpu.json, bench_sample_gpu.json, bench_activation_gpu.json,
# bench_speculative_gpu.json (with RA_RUN, a trained nested RA workdir)} and a log per benchmark. Each benchmark has its own time limit, so one
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

# GPT-2 small shape, bfloat16, 32 x 1024, cuDNN attention where it lowers; dense and RA a = 0.5,
# steps dispatched back to back as train.py runs them (synchronous times beside them).
run bench_mfu 150 --rounds=3
# Where the dense and RA steps' device time goes: a jax.profiler trace summed per kernel.
run profile_step 170 --steps=5 --top=60
# The dense step written other ways, in one process (found the batch-minor residual layout).
run probe_step_variants 200 --variants=base,posgather,tanh,posgather+tanh
# The sampler: dense, fixed widths and per-token draws at batch 1, and the full re-run.
run bench_sample 110 --repeats=5 --batches=1
# The :gpu model at its recipe's batch (64 x 256), nested mlp+heads, train and decode
# (compilation dominates here: about 15-30 s per train program on an H100).
run bench_activation 150 --batch_size=64 --sites="mlp,heads" --structures=nested \
    --fractions=1,0.5 --train_steps=10
# Self-speculative decoding at batch 1 on a trained run; prompts from a .npy beside it when the
# data set cannot be built (no TensorFlow): make it on a CPU first with --prompts_file.
if [ -n "${3:-}" ]; then
  run bench_speculative 150 --workdir="$3" --prompts_file="$3/prompts.npy" --draft_fractions=0.5 \
      --draft_tokens=2,4 --draft_caches=shared,separate --rounds=2
fi
