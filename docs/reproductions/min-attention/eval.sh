#!/usr/bin/env bash
# Out-of-distribution meta-test of each run folder given (default: both seed-0 runs), then the figures.
# LR=X adapts with a real-data step of X (`--adaptation-lr`, chosen by select-lr.sh) and writes
# RUN/eval-lrX-P.json; without it the training inner step is used and RUN/eval-P.json is written.
set -eu
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
export OMP_NUM_THREADS=1
RUNS=("$@"); [ ${#RUNS[@]} -gt 0 ] || RUNS=(runs/min-attention/alpha-0-s0 runs/min-attention/alpha-0.05-s0)
LR=${LR:-}
for RUN in "${RUNS[@]}"; do
  for P in None mass crippled-joint slope; do
    .venv/bin/bilevel eval "$RUN" --device cpu --perturb "$P" --episodes 5 --adaptation-episodes 5 --adaptation-steps 3 \
        ${LR:+--adaptation-lr "$LR"} --out "eval${LR:+-lr$LR}-$P.json"
  done
done
[ -n "$LR" ] || .venv/bin/bilevel plot "${RUNS[@]}" --out runs/min-attention/plots/return.png
