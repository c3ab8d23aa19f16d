#!/usr/bin/env bash
# The capacity experiment (configs/ablations/capacity.py) on one GPU, inside a time limit:
#
#     bash experiments/capacity_gpu.sh OUT_DIR DEADLINE_S [PYTHON]
#
# Two chains run side by side until DEADLINE_S seconds have passed:
#   A: the main comparison (3 seeds; 6 runs at a time), then the teacher path (fine-tunes of the
#      main sweep's dense parents), then the dense models at equal training FLOPs;
#   B: the training changes that might close the gap (`:gap`, 3 runs at a time), then the scan
#      that chose the recipe (3 runs at a time, its own sweep_dir).
# The small models leave one GPU mostly idle, so several processes share it (no preallocation);
# seeds share compiled programs through JAX's persistent compilation cache. At the deadline every
# training process is stopped (SIGTERM: it saves its step) and OUT_DIR/capacity_runs.tgz gets each
# run's config.json, metrics.jsonl, eval_curve.json and sweep.log: finished runs are what
# experiments/collect.py reads, unfinished ones still show their loss curves, and copied into
# runs/ a CPU sweep takes up the rest. Needs the corpus at data/sotu (`make corpus`, copied
# along: 5 MB).
set -u -m  # -m: each chain in a process group of its own, stopped as one at the deadline
out=${1:?usage: capacity_gpu.sh OUT_DIR DEADLINE_S [PYTHON]}
deadline=${2:?usage: capacity_gpu.sh OUT_DIR DEADLINE_S [PYTHON]}
py=${3:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/rag_jax_jit_cache}
export RAG_JAX_CAPACITY_RUNS=runs/capacity
log=$out/capacity_gpu.log
start=$SECONDS
echo "capacity_gpu: deadline ${deadline} s, $(date -u +%FT%TZ)" >"$log"

sweep() {  # sweep SPEC SWEEP_DIR JOBS
  $py experiments/sweep.py --config="configs/ablations/capacity.py:$1" --sweep_dir="$2" \
      --jobs="$3" >>"$out/sweep_$1.log" 2>&1
  echo "$1: exit $? after $((SECONDS - start)) s" >>"$log"
}
( sweep main runs/capacity 6; sweep teacher runs/capacity 6; sweep equal runs/capacity 6 ) &
chain_a=$!
( sweep gap runs/capacity 3; sweep scan runs/capacity_scan 3 ) &
chain_b=$!

while (( SECONDS - start < deadline )) && { kill -0 $chain_a 2>/dev/null || kill -0 $chain_b 2>/dev/null; }; do
  sleep 5
done
if kill -0 $chain_a 2>/dev/null || kill -0 $chain_b 2>/dev/null; then
  echo "deadline after $((SECONDS - start)) s: stopping the runs" >>"$log"
  kill -TERM -- -$chain_a -$chain_b 2>/dev/null
  sleep 10
  kill -KILL -- -$chain_a -$chain_b 2>/dev/null
fi
wait 2>/dev/null
for d in runs/capacity runs/capacity_scan; do
  echo "== $d: $(ls "$d" 2>/dev/null | wc -l) runs, $(ls "$d"/*/eval_curve.json 2>/dev/null | wc -l) evaluated" >>"$log"
done
find runs/capacity runs/capacity_scan -maxdepth 2 \( -name config.json -o -name metrics.jsonl \
    -o -name eval_curve.json -o -name sweep.log \) -print0 2>/dev/null \
  | tar -czf "$out/capacity_runs.tgz" --null -T -
echo "done after $((SECONDS - start)) s" >>"$log"
cat "$log"
