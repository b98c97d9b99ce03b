#!/usr/bin/env bash
# Data-parallel throughput on this machine: the bench config on one process (all cores) and
# on dp ranks (cores split between them), in one command; prints both and their ratio.
#   bash scripts/bench_dp.sh [dp=2] [steps=3]
set -euo pipefail
cd "$(dirname "$0")/.."
dp="${1:-2}"
steps="${2:-3}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
one=$(./build/moetrain bench --config configs/bench-cpu.toml --steps "$steps" --json)
many=$(mpirun --oversubscribe -np "$dp" ./build/moetrain bench --config configs/bench-cpu.toml \
         --steps "$steps" --json --set parallel.dp="$dp")
echo "dp=1:  $one"
echo "dp=$dp: $many"
tps() { sed -E 's/.*"tokens_per_s": ([0-9.e+]+).*/\1/' <<<"$1"; }
awk -v a="$(tps "$one")" -v b="$(tps "$many")" -v dp="$dp" \
  'BEGIN { printf "tokens/s dp=%d over dp=1: %.3f\n", dp, b / a }'
