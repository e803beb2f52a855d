#!/usr/bin/env bash
# The demo, end to end on the embedded synthetic dataset (generated on the fly in ScanNet's raw
# format): frames -> teacher -> points, then the verdict: pretrain with PPKT and with soft labels,
# fine-tune from scratch and from each with 20 labelled points per scene, and distil the
# PPKT-initialised network into a 2D network. Extra arguments go to every `lift3d` call.
set -euo pipefail
cd "$(dirname "$0")/.."
LIFT3D=${VENV:-.venv}/bin/lift3d
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
t0=$(date +%s)
for stage in frames teacher points; do
  "$LIFT3D" run "$stage" --rebuild "$@"   # the demo's own workdir: its stores follow the demo's settings
done
"$LIFT3D" verdict --seeds "${SEEDS:-0}" --la-points 20 "$@"
# the runs the verdict made are the stages of this configuration with 20 labelled points per scene
"$LIFT3D" status -o finetune.la_points=20 "$@"
"$LIFT3D" show synthetic 0 --out work/demo_frame0.png --ply work/demo_frame0.ply "$@"
echo "demo finished in $(( $(date +%s) - t0 )) s"
