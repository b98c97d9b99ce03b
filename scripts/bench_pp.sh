#!/usr/bin/env bash
# Pipeline-parallel step time and measured bubble per schedule, in one command: the bench
# config cut to 8 layers and 8 micro-batches of 2 sequences per step, on one process and on
# pp = 2 and pp = 4 ranks with each schedule. The bubble is the idlest rank's share of the
# step not spent computing (waiting for messages or for the schedule); the schedule's own
# prediction for equal chunks comes from `moetrain schedule`.
#   bash scripts/bench_pp.sh [steps=2]
# Ranks beyond the machine's cores time-share them, which inflates every bubble: read the
# numbers against each other, and against the simulated ones.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-2}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
bench=(./build/moetrain bench --config configs/bench-cpu.toml --steps "$steps" --json
       --set model.n_layers=8 --set training.micro_batch=2)
field() { sed -E "s/.*\"$2\": \"?([0-9a-z.e+-]+)\"?.*/\1/" <<<"$1"; }
one=$("${bench[@]}")
base=$(field "$one" step_s)
printf "%-10s %3s %9s %10s %10s %10s\n" schedule pp step_s "vs pp=1" bubble simulated
printf "%-10s %3s %9.3f %10s %10s %10s\n" none 1 "$base" 1.000 - -
for pp in 2 4; do
  for kind in 1f1b zb1p dualpipe dualpipev; do
    out=$(mpirun --oversubscribe -np "$pp" "${bench[@]}" --set parallel.pp="$pp" --set parallel.schedule="$kind")
    sim=$(./build/moetrain schedule --kind "$kind" --pp "$pp" --micro-batches 8 --json)
    printf "%-10s %3s %9.3f %10.3f %9.1f%% %9.1f%%\n" "$kind" "$pp" "$(field "$out" step_s)" \
      "$(awk -v a="$(field "$out" step_s)" -v b="$base" 'BEGIN{print a/b}')" \
      "$(awk -v x="$(field "$out" pipe_bubble)" 'BEGIN{print 100*x}')" \
      "$(awk -v b="$(field "$sim" bubble)" -v m="$(field "$sim" makespan)" 'BEGIN{print 100*b/m}')"
  done
done
