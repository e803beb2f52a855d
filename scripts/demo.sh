#!/usr/bin/env bash
# The demo, end to end on the embedded synthetic dataset (generated on the fly in ScanNet's raw
# format): frames -> teacher -> points, then the verdict (pretrain with PPKT and with soft labels,
# fine-tune from scratch and from each with 20 labelled points per scene), then 3D-to-2D
# distillation when it is built. Extra arguments go to every `lift3d` call (-c FILE, -o k=v).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
LIFT3D=${VENV:-.venv}/bin/lift3d
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
SEEDS=${SEEDS:-0}
t0=$(date +%s)
for stage in frames teacher points; do
  "$LIFT3D" run "$stage" "$@"
done
"$LIFT3D" verdict --seeds "$SEEDS" --la-points 20 "$@"
if "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('train.distill2d') is None)"; then
  "$LIFT3D" run distill2d -o finetune.la_points=20 "$@"
else
  echo "demo: stage 'distill2d' is not built yet in this version"
fi
"$LIFT3D" status -o finetune.la_points=20 "$@"
"$LIFT3D" show synthetic 0 --out work/demo_frame0.png --ply work/demo_frame0.ply "$@"
echo "demo finished in $(( $(date +%s) - t0 )) s"
