#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA device and the field's packages (a lent GPU machine has torch
# but not TorchOpt, Gymnasium or MuJoCo: wheels for its Python in .whl/, git-ignored, are installed to /tmp/site
# first). Fetch them beforehand on a machine with the package index, for that machine's Python (3.12 there):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
#     torchopt==0.7.3 optree graphviz gymnasium==1.4.0 farama-notifications mujoco==4.0.1 mujoco-core==4.0.1 \
#     mujoco-studio==4.0.1 glfw pyopengl box2d higher stable-baselines3
#   bash benchmarks/gpu_check.sh OUT_DIR [STEPS] [SECONDS]
# STEPS is a comma list of: tests (tests/test_cuda.py and the CUDA tests of tests/rl), mbmpo-0 and mbmpo-0.05
# (one first MB-MPO iteration at attention weight 0 / 0.05 at the reproduction's settings, on the GPU and then
# on this machine's CPU, one thread: benchmarks/mbmpo_iteration.py), maml (benchmarks/maml_meta_gradient.py on
# both devices), updates (one gradient update of DDPG, TD3, SAC and their MATT variants on both devices:
# benchmarks/off_policy_speed.py --updates-only), envsteps (env steps per second of our TD3, SAC and their MATT
# variants against Stable-Baselines3's TD3 and SAC, all networks on the GPU, then all on the CPU: the whole
# benchmarks/off_policy_speed.py). A step starts only while SECONDS (default 300) have not passed; each writes
# OUT_DIR/STEP.log (both devices' runs in one file).
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [STEPS] [SECONDS]}
steps=${2:-tests,mbmpo-0}
deadline=$((SECONDS + ${3:-300}))
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 - <<'EOF' 2>&1 | tee "$out/versions.txt"
import torch, torchopt, gymnasium, mujoco
print(f"torch {torch.__version__}, torchopt {torchopt.__version__}, gymnasium {gymnasium.__version__}, "
      f"mujoco {mujoco.__version__}, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'}")
EOF

run() {  # STEP TIMEOUT COMMAND...: appends to OUT_DIR/STEP.log, STEP without its -cuda / -cpu suffix (the device
  # tool brings back at most 8 files)
  local step=$1 limit=$2; shift 2
  local log="$out/${step%-cu*}" && log="${log%-cpu}.log"
  if [ $SECONDS -ge $deadline ]; then echo "$step: skipped, past the deadline" | tee -a "$out/summary.txt"; return; fi
  local start=$SECONDS
  echo "== $step: $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "$step: exit $? in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  tail -n 4 "$log"
}

for step in ${steps//,/ }; do
  case $step in
    tests) run tests 240 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_cuda.py tests/rl/test_collect.py \
             tests/rl/test_replay_buffer.py -k cuda ;;
    mbmpo-*) alpha=${step#mbmpo-}
             run "$step-cuda" 240 python3 benchmarks/mbmpo_iteration.py --alpha "$alpha" --device cuda
             run "$step-cpu" 240 python3 benchmarks/mbmpo_iteration.py --alpha "$alpha" --device cpu ;;
    maml) run maml-cuda 120 python3 benchmarks/maml_meta_gradient.py --device cuda
          run maml-cpu 120 python3 benchmarks/maml_meta_gradient.py --device cpu ;;
    updates) for device in cuda cpu; do
               run "updates-$device" 110 python3 benchmarks/off_policy_speed.py --updates-only --device $device \
                 --updates 100 --repeats 3 --meta-intervals 16
             done ;;
    envsteps) for device in cuda cpu; do
                run "envsteps-$device" 240 python3 benchmarks/off_policy_speed.py --device $device --chunk 300 \
                  --repeats 3 --meta-intervals 16 --updates 50
              done ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
