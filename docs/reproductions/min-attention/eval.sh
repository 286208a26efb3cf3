#!/usr/bin/env bash
# Out-of-distribution meta-test of each run folder given (default: both background runs), then the figures.
set -eu
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
export OMP_NUM_THREADS=1
RUNS=("$@"); [ ${#RUNS[@]} -gt 0 ] || RUNS=(runs/min-attention/alpha-0-s0 runs/min-attention/alpha-0.05-s0)
for RUN in "${RUNS[@]}"; do
  for P in None mass crippled-joint slope; do
    .venv/bin/bilevel eval "$RUN" --device cpu --perturb "$P" --episodes 5 --adaptation-episodes 5 --adaptation-steps 3
    cp "$RUN/eval.json" "$RUN/eval-$P.json"
  done
done
.venv/bin/bilevel plot "${RUNS[@]}" --out runs/min-attention/plots/return.png
