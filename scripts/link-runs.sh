#!/usr/bin/env bash
# Keep the run folders outside the work tree, which a fresh checkout lays anew (a long run's checkpoints
# then survive it on the same machine; a new machine starts without them, so what must outlive it is the
# record that `bilevel archive` commits): runs/ becomes a link to $BILEVEL_RUNS_HOME (default
# ~/.local/share/bilevel/runs).
# A real runs/ folder is moved there first (one rename on the same file system, so runs writing into it
# go on); where both hold a folder, the script stops and names it. Idempotent.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
home=${BILEVEL_RUNS_HOME:-$HOME/.local/share/bilevel/runs}
if [ -L runs ]; then
  echo "runs -> $(readlink runs)"; exit 0
fi
if [ -d runs ]; then
  mkdir -p "$(dirname "$home")"
  if [ -e "$home" ]; then
    for entry in runs/* runs/.[!.]*; do
      [ -e "$entry" ] || continue
      if [ -e "$home/$(basename "$entry")" ]; then
        echo "link-runs: both runs/ and $home hold $(basename "$entry"); move one aside first" >&2; exit 2
      fi
    done
    for entry in runs/* runs/.[!.]*; do [ -e "$entry" ] && mv "$entry" "$home/"; done
    rmdir runs
  else
    mv runs "$home"
  fi
fi
mkdir -p "$home"
ln -s "$home" runs
echo "runs -> $home"
