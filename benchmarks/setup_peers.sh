#!/usr/bin/env bash
# Virtual environments for the peers the benchmark compares against, kept apart from the project's
# .venv so their pins never touch ours:
#   .bench/trl      TRL's current release (SFTTrainer, RewardTrainer)
#   .bench/trl-ppo  trl==1.12.0, the last release with PPO (trl.experimental.ppo)
# torch is pinned in the same pip command: an unpinned torch resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${TORCH:-torch==2.13.0}"
TRL_CURRENT="${TRL_CURRENT:-trl}"
TRL_PPO="${TRL_PPO:-trl==1.12.0}"
PYTHON="${PYTHON:-python3}"

make_env() {  # make_env DIR SPEC
  local dir="$1" spec="$2"
  if [ -f "$dir/.installed" ] && [ "$(cat "$dir/.installed")" = "$spec $TORCH" ]; then
    echo "$dir: $spec present"; return
  fi
  echo "$dir: installing $spec with $TORCH"
  test -x "$dir/bin/python" || "$PYTHON" -m venv "$dir"
  # (this machine's pip config lists an index folder that may be absent: its warnings are filtered out)
  "$dir/bin/python" -m pip install -q --upgrade pip 2>&1 | (grep -v "is ignored: it is neither" || true)
  "$dir/bin/python" -m pip install -q "$TORCH" "$spec" accelerate datasets tokenizers 2>&1 \
    | (grep -v "is ignored: it is neither" || true)
  echo "$spec $TORCH" > "$dir/.installed"
}

mkdir -p .bench
make_env .bench/trl "$TRL_CURRENT"
make_env .bench/trl-ppo "$TRL_PPO"
for d in .bench/trl .bench/trl-ppo; do
  "$d/bin/python" -c "import trl, torch, transformers; print('$d', 'trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
done
