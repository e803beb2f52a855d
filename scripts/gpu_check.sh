#!/usr/bin/env bash
# One prepared check for a GPU machine (docs/backends.md#the-gpu-check), in under 8 minutes.
#
# 1. On a machine with internet, gather what the GPU machine cannot download (wheels for its Python,
#    spconv's CUDA wheels, MinkowskiEngine's sdist, OpenBLAS's Debian packages):
#        scripts/gpu_check.sh --download DIR [PYTHON_VERSION, default 3.11]
# 2. On the GPU machine (no internet, its own torch), from a copy of the repository:
#        WHEELS=DIR scripts/gpu_check.sh
#    It installs (LIFT3D_SYSTEM_TORCH=1, pip offline from DIR, MinkowskiEngine's CPU build), runs the
#    CUDA-only tests (the teacher's bf16 path; both sparse backends equal on CUDA), times the teacher
#    stage against its bare model and a pretraining and a fine-tuning step per backend, tries the
#    MinkowskiEngine CUDA build when nvcc is there, and prints one table, also written to
#    $GPU_CHECK_OUT/table.md (default work/gpu_check/) beside every step's log.
#    The CUDA build runs in the background from the end of the install on (nice 19, all cores but
#    two) into a throwaway venv that sees the machine's torch, so the checks keep the CPU build; it
#    gets the time left of the budget.
#
#   GPU_CHECK_BUDGET=470   seconds the whole check may take (the CUDA build gets what is left)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PINS=requirements/pins-x86_64-py311.txt
ME_SDIST=MinkowskiEngine-0.5.4.tar.gz

if [[ "${1:-}" == "--download" ]]; then
  DIR=${2:?usage: scripts/gpu_check.sh --download DIR [PYTHON_VERSION]}
  PYV=${3:-3.11}
  mkdir -p "$DIR/debs"
  PY=${PYTHON:-python3}
  grep -v -E '^(torch|torchvision|timm)==' "$PINS" > "$DIR/pins-no-torch.txt"
  plat=(--only-binary=:all: --python-version "$PYV" --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 --platform any)
  set -e
  "$PY" -m pip download -q -d "$DIR" "${plat[@]}" -r "$DIR/pins-no-torch.txt" "pip>=24"
  "$PY" -m pip download -q -d "$DIR" "${plat[@]}" -r requirements/build-minkowski.txt
  for cu in cu126 cu124 cu121 cu118; do  # the one install.sh picks depends on the machine's torch
    "$PY" -m pip download -q -d "$DIR" "${plat[@]}" "spconv-$cu==2.3.8" "cumm-$cu==0.7.11"
  done
  url=$("$PY" -c "import runpy; print(runpy.run_path('scripts/build_minkowski.py')['SDIST_URL'])")
  "$PY" -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "$url" "$DIR/$ME_SDIST"
  (cd "$DIR/debs" && apt-get download libopenblas-dev libopenblas0 libopenblas0-pthread libopenblas-pthread-dev) \
    || echo "gpu_check: no OpenBLAS .debs (apt-get download failed); the GPU machine must have libopenblas-dev" >&2
  echo "gpu_check: $(ls "$DIR" | wc -l) files in $DIR; on the GPU machine: WHEELS=$DIR scripts/gpu_check.sh"
  exit 0
fi

WHEELS=${WHEELS:?set WHEELS to the folder made by scripts/gpu_check.sh --download}
WHEELS=$(cd "$WHEELS" && pwd)
OUT=${GPU_CHECK_OUT:-$ROOT/work/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-470}
mkdir -p "$OUT"
START=$(date +%s)
PYBIN=$ROOT/.venv/bin/python
ROWS=()

elapsed() { echo $(($(date +%s) - START)); }
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }  # step, result, seconds, figures / detail
# step NAME LIMIT CMD...: runs CMD under a time limit, its output in $OUT/NAME.log; sets RC and SECS
step() {
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC=$?
  SECS=$(($(date +%s) - t0))
  echo "gpu_check: $name: exit $RC after ${SECS}s (log $OUT/$name.log)" >&2
}
verdict() { [[ $RC == 0 ]] && echo ok || { [[ $RC == 124 ]] && echo "timed out" || echo "FAILED ($RC)"; }; }
last_line() { grep -v -E '^\s*$' "$OUT/$1.log" | tail -1 | cut -c1-160 | tr '|' '/'; }
pytest_summary() { grep -E '(passed|failed|skipped|error)' "$OUT/$1.log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ in [0-9.]*s.*//'; }

# -- the machine
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
tinfo=$(python3 -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}')" 2>&1 | tail -1)
nvcc_v=$(command -v nvcc >/dev/null && nvcc --version | grep -o 'release [0-9.]*' || echo "no nvcc")
row "machine" "-" "-" "$gpu; $tinfo; nvcc $nvcc_v; $(nproc) cores"

# -- OpenBLAS (MinkowskiEngine links it): from the .debs brought along when missing
if ! ls /usr/include/*/cblas.h /usr/include/cblas.h >/dev/null 2>&1 && ls "$WHEELS"/debs/*.deb >/dev/null 2>&1; then
  step openblas 60 dpkg -i "$WHEELS"/debs/*.deb
  row "OpenBLAS from the .debs" "$(verdict)" "$SECS" "$(last_line openblas)"
fi

# -- install: offline, the machine's torch, MinkowskiEngine's CPU build (the CUDA build is tried last)
step install 330 env PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS" LIFT3D_SYSTEM_TORCH=1 LIFT3D_ME_CUDA=no \
  LIFT3D_SPCONV=auto LIFT3D_ME_SDIST="$WHEELS/$ME_SDIST" LIFT3D_CACHE="$OUT/cache" MAX_JOBS="$(nproc)" \
  bash scripts/install.sh
spc=$(grep -o 'spconv-cu[0-9]* 2.3.8' "$OUT/install.log" | head -1)
row "install (scripts/install.sh)" "$(verdict)" "$SECS" "${spc:-spconv CPU wheel}; $(last_line install)"

# -- MinkowskiEngine's CUDA build: in the background, into a throwaway venv, with the time left
ME_PID=
if command -v nvcc >/dev/null; then
  python3 -m venv --system-site-packages "$OUT/me-cuda-venv" >/dev/null 2>&1
  ME_LIMIT=$((BUDGET - $(elapsed) - 15))
  ME_T0=$(date +%s)
  (
    timeout "$ME_LIMIT" nice -n 19 env LIFT3D_ME_SDIST="$WHEELS/$ME_SDIST" PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS" \
      MAX_JOBS="$(($(nproc) > 4 ? $(nproc) - 2 : 2))" "$OUT/me-cuda-venv/bin/python" scripts/build_minkowski.py \
      --cuda yes --cache "$OUT/me-cuda" >"$OUT/me_cuda.log" 2>&1
    echo $? >"$OUT/me_cuda.rc"
  ) &
  ME_PID=$!
fi

# -- CUDA-only tests
step test_teacher_bf16 120 "$PYBIN" -m pytest -q -rs -p no:cacheprovider tests/stages/test_stage_teacher.py -k gpu_path
row "test: teacher bf16 path on CUDA" "$(verdict)" "$SECS" "$(pytest_summary test_teacher_bf16)"
step test_backends_cuda 180 "$PYBIN" -m pytest -q -rs -p no:cacheprovider tests/unit/test_backend_equality.py
row "test: both backends equal (CPU and CUDA)" "$(verdict)" "$SECS" "$(pytest_summary test_backends_cuda)"

# -- timings
step bench_teacher 120 "$PYBIN" benchmarks/bench_teacher.py --device cuda --frames 256 --size 240 320 \
  --input 240 320 --batch 32
st=$(grep -o 'stage (read -> model -> parts) *[0-9.]*' "$OUT/bench_teacher.log" | grep -o '[0-9.]*$')
bare=$(grep -o 'bare model, inputs on device *[0-9.]*' "$OUT/bench_teacher.log" | grep -o '[0-9.]*$')
ratio=$(grep -o 'stage / roofline = [0-9]* %' "$OUT/bench_teacher.log")
row "teacher stage vs bare model (EfficientNet-Lite0, 240x320, batch 32)" "$(verdict)" "$SECS" \
  "stage ${st:-?} frames/s, bare model ${bare:-?} frames/s; ${ratio:-see log}"
step bench_backends 150 "$PYBIN" benchmarks/bench_backends.py --device cuda --reps 5 --batch 8 --frames 8
row "pretraining / fine-tuning steps per backend (bench_backends.py --device cuda)" "$(verdict)" "$SECS" \
  "$(grep -c '^| pretrain\|^| finetune' "$OUT/bench_backends.log") rows below"
while IFS= read -r line; do
  IFS='|' read -r _ kind backend median minimum peak _ <<<"${line// /}"
  row "  $kind step, $backend (GPU)" "ok" "-" "median $median s, min $minimum s, peak CUDA memory $peak MiB"
done < <(grep -E '^\| (pretrain|finetune) \|' "$OUT/bench_backends.log")
grep -q 'not on this device' "$OUT/bench_backends.log" && row "  minkowski (GPU)" "n/a" "-" "MinkowskiEngine built without CUDA"

# -- the CUDA build's outcome
if [[ -n "$ME_PID" ]]; then
  wait "$ME_PID"
  RC=$(cat "$OUT/me_cuda.rc" 2>/dev/null || echo 1)
  SECS=$(($(date +%s) - ME_T0))
  if [[ $RC == 0 ]]; then
    row "MinkowskiEngine CUDA build" "built" "$SECS" "$(grep -m1 'MinkowskiEngine 0.5.4 ok' "$OUT/me_cuda.log" | tr '|' '/'); $("$OUT/me-cuda-venv/bin/python" -c 'import MinkowskiEngine as ME; print("is_cuda_available", ME.is_cuda_available())' 2>&1 | tail -1); wheel in $OUT/me-cuda/wheels"
  elif [[ $RC == 124 ]]; then
    row "MinkowskiEngine CUDA build" "not finished" "$SECS" "still compiling at the end of the ${BUDGET}s budget; see $OUT/me_cuda.log"
  else
    err=$(grep -h -m1 -E 'error' "$OUT"/me-cuda/wheels/*/build.log 2>/dev/null | head -1 | cut -c1-160 | tr '|' '/')
    row "MinkowskiEngine CUDA build" "FAILED ($RC)" "$SECS" "${err:-$(last_line me_cuda)}"
  fi
else
  row "MinkowskiEngine CUDA build" "not tried" "-" "no nvcc on PATH"
fi

{
  echo "GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s in all"
  echo
  echo "| step | result | seconds | figures / detail |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/table.md"
