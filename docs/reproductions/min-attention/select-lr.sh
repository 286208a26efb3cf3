#!/usr/bin/env bash
# Choose the meta-test's real-data step size (`--adaptation-lr`) of each run folder given, in
# distribution only: the training dynamics (no perturbation) and evaluation seed 1 (the out-of-
# distribution tables use seed 0). Writes RUN/eval-select-lrX.json for every candidate X and prints
# the criterion, the mean return after 1..3 adapted rounds (1000..3000 real steps).
set -eu
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
export OMP_NUM_THREADS=1
LRS=${LRS:-0.2 0.1 0.05 0.02 0.01 0.005}
for RUN in "$@"; do
  for LR in $LRS; do
    OUT="$RUN/eval-select-lr$LR.json"
    [ -f "$OUT" ] || .venv/bin/bilevel eval "$RUN" --device cpu --perturb None --episodes 5 --adaptation-episodes 5 \
        --adaptation-steps 3 --seed 1 --adaptation-lr "$LR" --out "$(basename "$OUT")" > /dev/null
    .venv/bin/python -c "import json, sys; d = json.load(open(sys.argv[1]))
print(sys.argv[1], 'return_0..3', [round(d[f'return_{k}']) for k in range(4)], 'criterion', round(sum(d[f'return_{k}'] for k in (1, 2, 3)) / 3, 1))" "$OUT"
  done
done
