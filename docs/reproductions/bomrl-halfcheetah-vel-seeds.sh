#!/usr/bin/env bash
# HalfCheetah-vel, seeds 0-2 of MAML-TRPO and BO-MRL on the HalfCheetah-dir protocol (batched collection,
# BO-MRL with the authors' lambda 0.5, the smooth clip 0.2 and 100 Adam steps), ITER iterations of
# 20 000 env steps (default 60 = 1.2 M), then the held-out evaluation of each run (10 velocities x 10
# episodes, evaluation seeds 0 and 1, kept as eval-ITER-seedK.json). Resumable: run it again
# (nohup docs/reproductions/bomrl-halfcheetah-vel-seeds.sh >> runs/cheetah-vel3/queue.log 2>&1 &);
# ITER=N continues every run to N. The committed package (git HEAD) is copied to runs/cheetah-vel3/code at
# start, so uncommitted edits and later commits do not reach the runs. After each training call, successful
# or not, and after the evaluations, the run's record (config, metrics, evaluations; no checkpoints) is
# archived to docs/reproductions/records/cheetah-vel3/, which the report's figures are drawn from.
set -u
# bash reads a script while it runs it, so this one runs from a private copy: editing the file cannot change a lane
[ -n "${LANE_SCRIPT:-}" ] || { copy=$(mktemp); cp "$0" "$copy"; LANE_SCRIPT=$0 exec bash "$copy" "$@"; }
cd "$(git -C "$(dirname "$LANE_SCRIPT")" rev-parse --show-toplevel)"
ITER=${ITER:-60}
SEEDS=${SEEDS:-0 1 2}
ROOT=runs/cheetah-vel3
RECORDS=docs/reproductions/records/cheetah-vel3
SNAP=$ROOT/code
mkdir -p "$ROOT"
rm -rf "$SNAP.new" && mkdir -p "$SNAP.new" && git archive HEAD bilevel | tar -x -C "$SNAP.new" && rm -rf "$SNAP" && mv "$SNAP.new" "$SNAP"
echo "$(date -u +%FT%TZ) code: $(git rev-parse --short HEAD)"
export PYTHONPATH=$PWD/$SNAP OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON=(--env halfcheetah-vel --meta-batch-size 10 --episodes-per-task 5 --checkpoint-every 5 --device cpu --no-progress)
declare -A EXTRA=([maml-trpo]="" [bomrl-neural]="--lam 0.5 --adapt-clip 0.2 --adapt-steps 100")
for ALGO in maml-trpo bomrl-neural; do
  for SEED in $SEEDS; do
    RUN=$ROOT/$ALGO-s$SEED
    if [ -f "$RUN/config.json" ]; then
      args=(--resume "$RUN" --iterations "$ITER" --no-progress)
    else
      # shellcheck disable=SC2206
      args=("${COMMON[@]}" ${EXTRA[$ALGO]} --iterations "$ITER" --seed "$SEED" --run-dir "$RUN")
    fi
    echo "$(date -u +%FT%TZ) $RUN -> $ITER"
    .venv/bin/bilevel train "$ALGO" "${args[@]}"
    status=$?
    .venv/bin/bilevel archive "$RUN" --to "$RECORDS"
    [ "$status" = 0 ] || exit 1
    for K in 0 1; do
      [ -f "$RUN/eval-$ITER-seed$K.json" ] && continue
      .venv/bin/bilevel eval "$RUN" --tasks 10 --episodes 10 --seed "$K" && cp "$RUN/eval.json" "$RUN/eval-$ITER-seed$K.json"
    done
    .venv/bin/bilevel archive "$RUN" --to "$RECORDS"
  done
done
echo "$(date -u +%FT%TZ) done"
