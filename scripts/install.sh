#!/usr/bin/env bash
# Set up lift3d's environment from nothing: a venv with pinned packages, MinkowskiEngine
# (built once, wheel cached outside the repo), and lift3d itself (editable).
# Re-running is cheap: a stamp records what was installed; change a pin and it re-syncs.
#
#   VENV=.venv            where the environment lives
#   PYTHON=python3        the interpreter to base it on (3.10+; pins are for 3.11 x86_64)
#   LIFT3D_CACHE=~/.cache/lift3d   where the MinkowskiEngine wheel is cached
#   LIFT3D_SYSTEM_TORCH=1 use the interpreter's existing torch/torchvision (GPU machines,
#                         no internet): the venv sees system site-packages, torch is not pinned
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
PINS=${LIFT3D_PINS:-requirements/pins-x86_64-py311.txt}
STAMP="$VENV/.lift3d-installed"
want=$(cat scripts/install.sh scripts/build_minkowski.py requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "[install] setting up $VENV (this takes ~15 min the first time: torch + a MinkowskiEngine build)"
if [[ ! -x "$VENV/bin/python" ]]; then
  if [[ "${LIFT3D_SYSTEM_TORCH:-0}" == 1 ]]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade "pip>=24" || { echo "[install] ERROR: could not upgrade pip in $VENV" >&2; exit 1; }
if [[ "${LIFT3D_SYSTEM_TORCH:-0}" == 1 ]]; then
  grep -v -E '^(torch|torchvision|timm)==' "$PINS" > "$VENV/pins-no-torch.txt"
  "${PIP[@]}" install -q -r "$VENV/pins-no-torch.txt" \
    || { echo "[install] ERROR: pip install of $PINS (without torch) failed; see the output above" >&2; exit 1; }
else
  "${PIP[@]}" install -q -r "$PINS" \
    || { echo "[install] ERROR: pip install -r $PINS failed; see the output above" >&2; exit 1; }
fi
"$VENV/bin/python" scripts/build_minkowski.py \
  || { echo "[install] ERROR: MinkowskiEngine could not be set up (message above); the environment is NOT complete" >&2; exit 1; }
"${PIP[@]}" install -q --no-deps --no-build-isolation -e . \
  || { echo "[install] ERROR: pip install -e . failed" >&2; exit 1; }
"$VENV/bin/python" -c "import torch, torchvision, timm, MinkowskiEngine, zarr, dask.distributed, cv2, yaml, click, lift3d.cli, lift3d.pipeline.frames, lift3d.train.pretrain" \
  || { echo "[install] ERROR: import check failed in $VENV" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[install] done: $VENV"
