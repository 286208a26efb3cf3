#!/usr/bin/env bash
# MB-MPO on HalfCheetah (horizon 200) toward 101k real steps (5000 random + 24 iterations x 4000), one
# lane per alpha (ALPHAS, default "0 0.05"), each lane training its seeds (SEEDS, default "0 1 2") one
# after another. Resumable: run it again (nohup docs/reproductions/min-attention/run.sh
# > runs/min-attention/run.log 2>&1 &) to continue each run from its last checkpoint; ITER=N raises
# the target. A lane whose run is still training (an earlier invocation) waits for it to end. The
# package is copied to runs/min-attention/code at start, so edits to the working tree do not reach
# the runs this invocation starts. One thread per process. After each training call, successful or not,
# the run's record (config, metrics, evaluations; no checkpoints) is archived to
# docs/reproductions/records/min-attention/, which the report's figures and summary are drawn from (a run
# rebuilt from scratch is not archived until it has caught up with its record: `bilevel archive` refuses). A
# seed whose run folder is absent but whose record reached ITER is done (a fresh checkout has no runs/).
# Run scripts/link-runs.sh once first: it keeps runs/ outside the work tree, which a fresh checkout lays anew.
# ENV=hopper or walker2d trains that env instead (runs/min-attention-ENV/, records/min-attention-ENV/).
set -u
# bash reads a script while it runs it, so this one runs from a private copy: editing the file cannot change a lane
[ -n "${LANE_SCRIPT:-}" ] || { copy=$(mktemp); cp "$0" "$copy"; LANE_SCRIPT=$0 exec bash "$copy" "$@"; }
cd "$(git -C "$(dirname "$LANE_SCRIPT")" rev-parse --show-toplevel)"
for name in ITER ALPHAS SEEDS; do  # set but empty would silently mean the default
  if [ -n "${!name+set}" ] && [ -z "${!name}" ]; then echo "run.sh: $name is set but empty" >&2; exit 2; fi
done
ITER=${ITER:-24}
ALPHAS=${ALPHAS:-0 0.05}
SEEDS=${SEEDS:-0 1 2}
ENV=${ENV:-halfcheetah}
GROUP=min-attention; [ "$ENV" = halfcheetah ] || GROUP=min-attention-$ENV
SNAP=${SNAP:-runs/$GROUP/code}
mkdir -p "runs/$GROUP"
rm -rf "$SNAP.new" && mkdir -p "$SNAP.new" && cp -r bilevel "$SNAP.new/" && rm -rf "$SNAP" && mv "$SNAP.new" "$SNAP"
export PYTHONPATH=$PWD/$SNAP OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

train() {  # ALPHA SEED
  local run=runs/$GROUP/alpha-$1-s$2 args
  while pgrep -f -- "$run( |\$)" >/dev/null; do sleep 60; done
  local record=docs/reproductions/records/$GROUP/alpha-$1-s$2/metrics.csv
  if [ ! -f "$run/config.json" ] && [ -f "$record" ] && [ "$(tail -n 1 "$record" | cut -d, -f1)" -ge "$ITER" ]; then
    echo "$(date -u +%FT%TZ) $run: its record reached $ITER"; return
  fi
  if [ -f "$run/config.json" ]; then
    args=(mbmpo --resume "$run" --iterations "$ITER" --no-progress)
  else
    args=(mbmpo --env "$ENV" --seed "$2" --attention-weight "$1" --iterations "$ITER"
          --initial-random-steps 5000 --episodes-per-model 4 --meta-steps 15 --imagined-trajectories 20
          --checkpoint-every 1 --threads 1 --device cpu --no-progress --run-dir "$run")
  fi
  echo "$(date -u +%FT%TZ) $run -> $ITER"
  .venv/bin/bilevel train "${args[@]}" >> "$run.log" 2>&1
  local status=$?
  .venv/bin/bilevel archive "$run" --to "docs/reproductions/records/$GROUP" >> "$run.log" 2>&1
  echo "$(date -u +%FT%TZ) $run exit $status"
}

for ALPHA in $ALPHAS; do
  ( for SEED in $SEEDS; do train "$ALPHA" "$SEED"; done ) &
done
wait
