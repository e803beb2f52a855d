"""``lift3d eval teacher``: the teacher's 2D pseudo-label mIoU against ground-truth 2D labels.

For every frame of ``frames.zarr/<dataset>`` that has a ground-truth label image:

- prediction: the top-1 class of ``teacher.zarr/<teacher>/<dataset>/soft_labels/index``
  (index 0 = most probable), mapped to ScanNet-20 with
  :func:`lift3d.core.classmaps.teacher_to_scannet20` (a class with no ScanNet-20 counterpart
  predicts "none"), brought to the stored H x W by the stores' cell mapping (docs/stores.md): stored pixel
  (r, c) takes the cell whose area contains its centre, i = floor((r + 0.5) hs / H),
  j = floor((c + 0.5) ws / W) (the nearest cell centre, align_corners = False);
- ground truth: ScanNet's ``label-filt/<frame>.png`` (16-bit ScanNet label ids, from
  ``<root>/scans/<scene>/<scene>_2d-label-filt.zip``, or an unpacked
  ``<root>/scans/<scene>/label-filt/`` folder), mapped id -> NYU40 through
  ``<root>/scannetv2-labels.combined.tsv`` (column ``nyu40id``), then NYU40 -> ScanNet-20
  (other classes ignored); brought to the stored H x W by the same nearest-centre rule
  (label images are at colour resolution, the stored frames at the depth grid's).

Reported: per-class IoU over the ScanNet-20 classes present in the ground truth, their mean
(mIoU), and the pixel coverage: the fraction of labelled pixels whose predicted class maps to
a ScanNet-20 class at all (a "none" prediction counts as a miss for the IoU).

The label images are read by :mod:`lift3d.pipeline.readers.scannet_labels`;
``eval_teacher(..., labels=fn)`` takes any other source of label images.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from lift3d.core.classmaps import IGNORE_INDEX, scannet20_names, teacher_to_scannet20
from lift3d.core.config import workdir as get_workdir
from lift3d.core.graph import groups
from lift3d.core.metrics import confusion_with_none as confusion
from lift3d.core.metrics import pixel_scores as scores
from lift3d.core.store import open_group
from lift3d.pipeline.readers.common import nearest_index, to_grid
from lift3d.pipeline.readers.scannet_labels import default_labels

log = logging.getLogger("lift3d")
N_CLASSES = 20  # ScanNet-20


# ----------------------------------------------------------------------------- the evaluation


def eval_teacher(cfg: dict, dataset: str, labels: Callable | None = None) -> dict:
    """mIoU of the teacher's top-1 pseudo-labels (ScanNet-20) against the dataset's 2D labels.

    ``labels(scene, source_index)`` -> ScanNet-20 index per pixel (any size; IGNORE_INDEX or any value outside 0..19
    = unlabelled) or None; by default ScanNet's label-filt PNGs for ScanNet-layout datasets.
    """
    wd = get_workdir(cfg)
    matches = [g for g in groups(cfg, "teacher") if g.config["dataset"]["name"] == dataset]
    if not matches:
        raise KeyError(
            f"dataset {dataset!r} is not configured; datasets: {', '.join(d['name'] for d in cfg['datasets'])}"
        )
    g = matches[0]
    entry = g.config["dataset"]
    out = {"dataset": dataset, "teacher": cfg["teacher"]["name"], "kind": entry["kind"]}
    # the stores first: a missing or stale cache is the error to report, not missing labels
    frames = open_group(wd, "frames", g.upstream.path, expect_lineage=g.upstream.lineage_sha256)
    teacher = open_group(wd, "teacher", g.path, expect_lineage=g.lineage_sha256)
    own = labels is None
    labels = labels or default_labels(entry, wd)
    if labels is None:
        return {
            **out,
            "evaluated": False,
            "reason": f"no ground-truth 2D labels for kind {entry['kind']!r} (ScanNet layout with "
            f"scans/<scene>/<scene>_2d-label-filt.zip needed)",
        }
    lut = teacher_to_scannet20(list(teacher.attrs["classes"]), IGNORE_INDEX)
    index = teacher["soft_labels/index"]
    scenes = list(frames.attrs["scenes"])
    scene_index = frames["scene_index"][...]
    source_index = frames["source_index"][...]
    h_img, w_img = frames["rgb"].shape[1:3]
    hs, ws = index.shape[2:4]
    rows, cols = nearest_index(h_img, hs), nearest_index(w_img, ws)
    conf = np.zeros((N_CLASSES, N_CLASSES + 1), dtype=np.int64)
    done = missing = 0
    try:
        for i in range(len(source_index)):
            gt = labels(scenes[scene_index[i]], int(source_index[i]))
            if gt is None:
                missing += 1
                continue
            gt = to_grid(np.asarray(gt), h_img, w_img).astype(np.int64)
            top1 = lut[index[i, 0].astype(np.int64)]  # (hs, ws) ScanNet-20 or IGNORE_INDEX
            pred = top1[rows[:, None], cols[None, :]]
            conf += confusion(gt, pred)
            done += 1
    finally:
        if own and hasattr(labels, "close"):
            labels.close()
    res = scores(conf, scannet20_names())
    log.info(
        "eval teacher %s/%s: %d frames, mIoU %s over %d classes, coverage %s",
        out["teacher"],
        dataset,
        done,
        res["miou"],
        res["classes_present"],
        res["coverage"],
    )
    return {**out, "evaluated": True, "frames": done, "frames_without_labels": missing, **res}
