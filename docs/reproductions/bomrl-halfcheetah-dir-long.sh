#!/usr/bin/env bash
# HalfCheetah-dir, seed 0, past the 1.2 M-step comparison: MAML-TRPO and BO-MRL continue from their
# 60-iteration runs (runs/cheetah-dir/{maml-trpo,bomrl-neural}-s0) in alternating stages, so that both
# always stand at the same budget, and each stage ends with the held-out evaluation of both, kept as
# eval-ITERATION.json. Resumable: run it again to continue (nohup docs/reproductions/bomrl-halfcheetah-dir-long.sh
# > runs/cheetah-dir/long.log 2>&1 &). STAGES lists the iteration targets (20k env steps each). After each
# training call, successful or not, and after each evaluation, the run's record (config, metrics,
# evaluations; no checkpoints) is archived to docs/reproductions/records/cheetah-dir/.
set -u
# bash reads a script while it runs it, so this one runs from a private copy: editing the file cannot change a lane
[ -n "${LANE_SCRIPT:-}" ] || { copy=$(mktemp); cp "$0" "$copy"; LANE_SCRIPT=$0 exec bash "$copy" "$@"; }
cd "$(git -C "$(dirname "$LANE_SCRIPT")" rev-parse --show-toplevel)"
STAGES=${STAGES:-100 150 200 300 400 500}
SNAP=runs/cheetah-dir/code
RECORDS=docs/reproductions/records/cheetah-dir
rm -rf "$SNAP.new" && mkdir -p "$SNAP.new" && cp -r bilevel "$SNAP.new/" && rm -rf "$SNAP" && mv "$SNAP.new" "$SNAP"
export PYTHONPATH=$PWD/$SNAP OMP_NUM_THREADS=1
for TARGET in $STAGES; do
  for ALGO in maml-trpo bomrl-neural; do
    RUN=runs/cheetah-dir/$ALGO-s0
    [ -f "$RUN/eval-$TARGET.json" ] && continue
    echo "$(date -u +%FT%TZ) $RUN -> $TARGET"
    .venv/bin/bilevel train "$ALGO" --resume "$RUN" --iterations "$TARGET" --no-progress
    status=$?
    .venv/bin/bilevel archive "$RUN" --to "$RECORDS"
    [ "$status" = 0 ] || exit 1
    .venv/bin/bilevel eval "$RUN" --tasks 2 --episodes 20 --seed 0 && cp "$RUN/eval.json" "$RUN/eval-$TARGET.json"
    .venv/bin/bilevel archive "$RUN" --to "$RECORDS"
  done
done
