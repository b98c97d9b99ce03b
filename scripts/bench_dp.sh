#!/usr/bin/env bash
# Data- and expert-parallel throughput on this machine, in one command: the bench config on
# one process (all cores), on dp ranks (cores split between them), and on dp ranks with
# ep = dp (routed experts sharded, tokens dispatched all-to-all). Prints each run's JSON and
#   - tokens/s of dp ranks over one process,
#   - the fraction of gradient-reduction time hidden behind backward (overlapped buckets vs
#     the same reduction after backward, measured in the same run),
#   - the expert dispatch's bytes per token per MoE layer against the routing's minimum.
#   bash scripts/bench_dp.sh [dp=2] [steps=3]
set -euo pipefail
cd "$(dirname "$0")/.."
dp="${1:-2}"
steps="${2:-3}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
bench=(./build/moetrain bench --config configs/bench-cpu.toml --steps "$steps" --json)
one=$("${bench[@]}")
many=$(mpirun --oversubscribe -np "$dp" "${bench[@]}" --set parallel.dp="$dp")
ep=$(mpirun --oversubscribe -np "$dp" "${bench[@]}" --set parallel.dp="$dp" --set parallel.ep="$dp")
echo "dp=1:       $one"
echo "dp=$dp:       $many"
echo "dp=$dp ep=$dp: $ep"
field() { sed -E "s/.*\"$2\": ([0-9.e+-]+).*/\1/" <<<"$1"; }
awk -v a="$(field "$one" tokens_per_s)" -v b="$(field "$many" tokens_per_s)" \
    -v c="$(field "$ep" tokens_per_s)" -v dp="$dp" \
  'BEGIN { printf "tokens/s over dp=1: dp=%d %.3f, dp=%d ep=%d %.3f\n", dp, b / a, dp, dp, c / a }'
for run in "$many" "$ep"; do
  printf "dp=%s ep=%s: gradient reduction %.1f%% hidden (%.4f s exposed of %.4f s)\n" \
    "$(field "$run" dp)" "$(field "$run" ep)" "$(awk -v h="$(field "$run" reduction_hidden)" 'BEGIN{print 100*h}')" \
    "$(field "$run" reduction_exposed_s)" "$(field "$run" reduction_blocking_s)"
done
awk -v s="$(field "$ep" a2a_bytes_per_token)" -v m="$(field "$ep" a2a_min_bytes_per_token)" \
  'BEGIN { printf "all-to-all: %.0f bytes/token/MoE layer sent, routing minimum %.0f (x%.2f)\n", s, m, m > 0 ? s / m : 0 }'
