#!/usr/bin/env bash
# How much communication DualPipe's overlapped F&B pairs hide, in one command: the bench
# config cut to 8 layers and micro-batches of 2 sequences, on pp = 2 x dp = 2 x ep = 2 ranks
# (expert all-to-alls and pipeline messages both in play), for dualpipe and dualpipev. The
# bench runs the same pairs alternately interleaved piece by piece and one chunk after the
# other, and sums over ranks the time each spent blocked on communication inside pairs.
#   bash scripts/bench_fb.sh [steps=3]
# Four ranks on a machine with fewer cores time-share them: most of the "communication"
# time is then a rank waiting for a peer that is not running, which is what interleaving can
# hide here; real transfers on one machine are memory copies.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-3}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
field() { sed -E "s/.*\"$2\": \"?([0-9a-z.e+-]+)\"?.*/\1/" <<<"$1"; }
printf "%-10s %12s %12s %12s %12s %8s\n" schedule "pair_s" "seq_pair_s" "comm_share" "seq_share" hidden
for kind in dualpipe dualpipev; do
  out=$(mpirun --oversubscribe -np 4 ./build/moetrain bench --config configs/bench-cpu.toml \
        --steps "$steps" --json --set model.n_layers=8 --set training.micro_batch=2 \
        --set parallel.pp=2 --set parallel.dp=2 --set parallel.ep=2 --set parallel.schedule="$kind")
  printf "%-10s %12.4f %12.4f %11.1f%% %11.1f%% %7.1f%%\n" "$kind" "$(field "$out" fb_pair_s)" \
    "$(field "$out" fb_pair_sequential_s)" \
    "$(awk -v x="$(field "$out" fb_comm_share)" 'BEGIN{print 100*x}')" \
    "$(awk -v x="$(field "$out" fb_comm_share_sequential)" 'BEGIN{print 100*x}')" \
    "$(awk -v x="$(field "$out" fb_comm_hidden)" 'BEGIN{print 100*x}')"
done
