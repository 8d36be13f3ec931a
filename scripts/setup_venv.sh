#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv in the repo root and install medllava into it.
# On a machine without an NVIDIA GPU torch comes as the pinned CPU build, never the multi-GB CUDA wheels.
# Versions come from requirements/lock.txt (constraints; regenerate with scripts/lock.sh), so every machine of a
# kind resolves the same environment. Re-running is cheap: nothing is reinstalled while pyproject.toml, the lock
# and this script are unchanged.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python_bin=${PYTHON:-python3}
# shellcheck source=scripts/cpu_torch.sh
source "$root/scripts/cpu_torch.sh"

[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
py="$venv/bin/python"
stamp="$venv/.medllava-install"
lock="$root/requirements/lock.txt"
want=$(cat "$root/pyproject.toml" "$root/scripts/setup_venv.sh" "$root/scripts/cpu_torch.sh" "$lock" | sha256sum | cut -c1-16)
ready() { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import medllava, data_recipes, torch, torchvision" 2>/dev/null; }
ready && exit 0
# Several runs at once (train.sh on every node of a shared checkout, rehearsals side by side) install one at a time;
# the ones that waited find the work done.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$venv/.install.lock"
  flock 9
  ready && exit 0
fi

pip_install() {  # quiet pip; drop the warnings some machines' pip config prints about missing local indexes
  "$py" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

echo "[setup] installing medllava into $venv (one-time, about 5 minutes)" >&2
pip_install --upgrade pip
if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -c "import torch" 2>/dev/null || pip_install torch
    # torchvision matching the torch already there (the GPU image's CUDA build is kept)
    pip_install "torchvision" -c <("$py" -c "import torch; print('torch==' + torch.__version__.split('+')[0])")
  else
    # CPU machine: pin the pair (set PIP_EXTRA_INDEX_URL to PyTorch's CPU index where no local wheel exists).
    # shellcheck disable=SC2086
    pip_install $cpu_torch
  fi
fi
pip_install -c "$lock" -e "$root[dev]"
"$py" -c "import medllava, data_recipes, torch, torchvision; print(f'[setup] medllava ready: torch {torch.__version__}, torchvision {torchvision.__version__}')" >&2
echo "$want" >"$stamp"
