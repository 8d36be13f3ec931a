#!/usr/bin/env bash
# Re-resolve the pinned environment: install medllava[dev] into a throw-away venv with nothing pinned, then write
# every resolved version (except torch, which scripts/setup_venv.sh pins per machine kind, and medllava itself)
# to requirements/lock.txt. scripts/setup_venv.sh installs with `-c requirements/lock.txt` on CPU and GPU machines.
#
#   scripts/lock.sh            # then re-run the demo (scripts/demo_seeds.py) and commit both
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python_bin=${PYTHON:-python3}
# shellcheck source=scripts/cpu_torch.sh
source "$root/scripts/cpu_torch.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python_bin" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
pip_install() {  # quiet pip; drop the warnings some machines' pip config prints about missing local indexes
  "$py" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
# shellcheck disable=SC2086
pip_install $cpu_torch
pip_install "$root[dev]"
{
  echo "# Pinned environment for medllava (constraints, not requirements): written by scripts/lock.sh"
  echo "# from a fresh resolve of medllava[dev] with $("$py" --version) on $(uname -m); torch is pinned by"
  echo "# scripts/setup_venv.sh (CPU: ${cpu_torch}; GPU machines keep their CUDA build)."
  "$py" -m pip freeze --exclude-editable | grep -viE '^(torch|torchvision|medllava|nvidia-[a-z0-9-]+|cuda-[a-z-]+|triton)(==| @)' | sort -f
} >"$root/requirements/lock.txt"
echo "[lock] wrote $root/requirements/lock.txt ($(grep -vc '^#' "$root/requirements/lock.txt") packages)" >&2
