#!/usr/bin/env bash
# MB-MPO on HalfCheetah (horizon 200), alpha = 0 and alpha = 0.05, seed 0, toward 101k real steps
# (5000 random + 24 iterations x 4000). Resumable: run it again (nohup runs/min-attention/run.sh
# > runs/min-attention/run.log 2>&1 &) to continue each run from its last checkpoint; ITER=N raises the
# target. A run whose process is still alive is left alone. Two processes, one thread each.
set -u
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
ITER=${ITER:-24}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for ALPHA in 0 0.05; do
  RUN=runs/min-attention/alpha-$ALPHA-s0
  if pgrep -f -- "$RUN( |\$)" >/dev/null; then
    echo "$RUN is still training; not starting it again"
    continue
  fi
  if [ -f "$RUN/config.json" ]; then
    ARGS=(mbmpo --resume "$RUN" --iterations "$ITER" --no-progress)
  else
    ARGS=(mbmpo --env halfcheetah --seed 0 --attention-weight "$ALPHA" --iterations "$ITER"
          --initial-random-steps 5000 --episodes-per-model 4 --meta-steps 15 --imagined-trajectories 20
          --checkpoint-every 1 --threads 1 --device cpu --no-progress --run-dir "$RUN")
  fi
  .venv/bin/bilevel train "${ARGS[@]}" >> "runs/min-attention/alpha-$ALPHA-s0.log" 2>&1 &
done
wait
