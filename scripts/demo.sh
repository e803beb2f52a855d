#!/usr/bin/env bash
# The demo, end to end on the embedded synthetic datasets (generated on the fly in ScanNet's raw
# format): frames (the 3D rooms and a separate 2D corpus) -> fit2d (a ScanNet-20 teacher fitted
# on the corpus) -> teacher (its features and soft labels on the 3D rooms' frames) -> points, then
# the verdict: pretrain with PPKT and soft labels (the fitted teacher) and PPKT on the ImageNet
# teacher, fine-tune from scratch, from each and from the supervised ceiling with 20 labelled points
# in each of 4 rooms, the colour and linear-probe baselines and the shuffled-pairs control, and distil
# the PPKT-initialised network into a 2D network.
# Extra arguments go to every `lift3d` call; without a -c the demo's configs/demo.yaml is used.
set -euo pipefail
cd "$(dirname "$0")/.."
LIFT3D=${VENV:-.venv}/bin/lift3d
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
case " $* " in *" -c "*|*" --config "*) ;; *) set -- -c configs/demo.yaml "$@" ;; esac
t0=$(date +%s)
for stage in frames fit2d teacher points; do
  t1=$(date +%s)
  "$LIFT3D" run "$stage" --rebuild "$@"   # the demo's own workdir: its stores follow the demo's settings
  echo "demo: $stage took $(( $(date +%s) - t1 )) s"
done
"$LIFT3D" eval teacher "$@"   # the fitted teacher's 2D mIoU on the 3D rooms' frames
"$LIFT3D" verdict --seeds "${SEEDS:-0}" --la-points 20 --rooms 4 --methods ppnce,soft_ce,ppnce_imagenet --rebuild "$@"
"$LIFT3D" show synthetic 0 --out work/demo_frame0.png --ply work/demo_frame0.ply "$@"
echo "demo finished in $(( $(date +%s) - t0 )) s"
