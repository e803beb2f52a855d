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
#   LIFT3D_SPCONV=auto|cpu|cuda  which spconv build (the second sparse backend): auto = the CUDA
#                         wheel spconv-cu12x 2.3.8 matching torch's CUDA where torch is a CUDA build
#                         and a GPU answers nvidia-smi, else the CPU wheel of the pins
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
# spconv (the second sparse backend): the pins hold the CPU wheel; a CUDA torch on a machine with a GPU
# gets spconv-cu12x instead. spconv-cu126 is the newest CUDA build of 2.3.8: it also serves CUDA 13
# torches (a CUDA 13 driver runs CUDA 12 code). Prints the wheel's suffix (cu126, ...) or nothing (CPU).
choose_spconv() {
  "$VENV/bin/python" - "${LIFT3D_SPCONV:-auto}" <<'PY'
import shutil, subprocess, sys
import torch
mode, cuda = sys.argv[1], torch.version.cuda
gpu = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
if mode == "cpu" or not cuda or (mode == "auto" and not gpu):
    print("")
else:
    major, minor = (int(v) for v in cuda.split(".")[:2])
    if major >= 13 or (major, minor) >= (12, 6):
        print("cu126")
    elif (major, minor) >= (12, 4):
        print("cu124")
    elif (major, minor) >= (12, 1):
        print("cu121")
    elif (major, minor) >= (11, 8):
        print("cu118")
    else:
        sys.exit(f"torch's CUDA {cuda} has no spconv 2.3.8 wheel (11.8, 12.1, 12.4, 12.6+); set LIFT3D_SPCONV=cpu")
PY
}
if [[ "${LIFT3D_SYSTEM_TORCH:-0}" == 1 ]]; then
  SPCONV_CUDA=$(choose_spconv) || { echo "[install] ERROR: choosing the spconv build failed (message above)" >&2; exit 1; }
  skip='torch|torchvision|timm'
  [[ -n "$SPCONV_CUDA" ]] && skip="$skip|spconv|cumm"
  grep -v -E "^($skip)==" "$PINS" > "$VENV/pins-no-torch.txt"
  "${PIP[@]}" install -q -r "$VENV/pins-no-torch.txt" \
    || { echo "[install] ERROR: pip install of $PINS (without torch) failed; see the output above" >&2; exit 1; }
else
  "${PIP[@]}" install -q -r "$PINS" \
    || { echo "[install] ERROR: pip install -r $PINS failed; see the output above" >&2; exit 1; }
  SPCONV_CUDA=$(choose_spconv) || { echo "[install] ERROR: choosing the spconv build failed (message above)" >&2; exit 1; }
fi
if [[ -n "$SPCONV_CUDA" ]]; then
  echo "[install] spconv: the CUDA build spconv-$SPCONV_CUDA 2.3.8 (torch $("$VENV/bin/python" -c 'import torch; print(torch.version.cuda)') and a GPU)"
  "${PIP[@]}" uninstall -q -y spconv cumm >/dev/null 2>&1 || true
  "${PIP[@]}" install -q "spconv-$SPCONV_CUDA==2.3.8" "cumm-$SPCONV_CUDA==0.7.11" \
    || { echo "[install] ERROR: pip install spconv-$SPCONV_CUDA==2.3.8 failed (offline: bring its wheels, PIP_FIND_LINKS)" >&2; exit 1; }
fi
"$VENV/bin/python" scripts/build_minkowski.py \
  || { echo "[install] ERROR: MinkowskiEngine could not be set up (message above); the environment is NOT complete" >&2; exit 1; }
"${PIP[@]}" install -q --no-deps --no-build-isolation -e . \
  || { echo "[install] ERROR: pip install -e . failed" >&2; exit 1; }
"$VENV/bin/python" -c "import torch, torchvision, timm, MinkowskiEngine, spconv.pytorch, zarr, dask.distributed, cv2, yaml, click, lift3d.cli, lift3d.pipeline.frames, lift3d.train.pretrain" \
  || { echo "[install] ERROR: import check failed in $VENV" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[install] done: $VENV"
