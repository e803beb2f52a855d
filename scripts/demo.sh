#!/usr/bin/env bash
# The demo: every stage that exists, end to end, on the embedded synthetic dataset
# (generated on the fly in ScanNet's raw format). Extra arguments go to `lift3d run`.
set -euo pipefail
cd "$(dirname "$0")/.."
LIFT3D=${VENV:-.venv}/bin/lift3d
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
t0=$(date +%s)
for stage in frames teacher points pretrain finetune distill2d; do
  if ! ${VENV:-.venv}/bin/python -c "import importlib.util,sys; from lift3d.stages import RUNNERS; sys.exit(importlib.util.find_spec(RUNNERS['$stage']) is None)"; then
    echo "demo: stage '$stage' is not built yet in this version; stopping here"
    break
  fi
  "$LIFT3D" run "$stage" "$@"
done
"$LIFT3D" status "$@"
if ${VENV:-.venv}/bin/python -c "import pipeline.show" 2>/dev/null; then
  "$LIFT3D" show synthetic 0 --out work/demo_frame0.png --ply work/demo_frame0.ply "$@"
fi
echo "demo finished in $(( $(date +%s) - t0 )) s"
