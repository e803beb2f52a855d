"""``lift3d eval teacher``: the teacher's 2D pseudo-label mIoU against ground-truth 2D labels.

For every frame of ``frames.zarr/<dataset>`` that has a ground-truth label image:

- prediction: the stored soft labels (``teacher.zarr/<teacher>/<dataset>/soft_labels``) sampled
  bilinearly at every stored pixel, as the pretraining loader samples them for a point
  (:func:`lift3d.nets.heads.sample_soft_labels`), folded into ScanNet-20 plus "none" by summing
  the probability of the teacher classes that map to each (:func:`lift3d.core.classmaps.
  teacher_to_scannet20`); the pixel predicts the class with the most mass ("none" counts as a miss);
- ground truth: ScanNet's ``label-filt/<frame>.png`` (16-bit ScanNet label ids, from
  ``<root>/scans/<scene>/<scene>_2d-label-filt.zip``, or an unpacked
  ``<root>/scans/<scene>/label-filt/`` folder), mapped id -> NYU40 through
  ``<root>/scannetv2-labels.combined.tsv`` (column ``nyu40id``), then NYU40 -> ScanNet-20
  (other classes ignored); brought to the stored H x W by the same nearest-centre rule
  (label images are at colour resolution, the stored frames at the depth grid's).

Reported: per-class IoU over the ScanNet-20 classes present in the ground truth, their mean
(mIoU), and the pixel coverage: the fraction of labelled pixels whose predicted class maps to
a ScanNet-20 class at all (a "none" prediction counts as a miss for the IoU). And ``cell_nn``,
what the cached features know: each teacher cell labelled with the most common class of its
pixels, a 1-nearest-neighbour classifier fitted on the first scene's cells and tested on the
other scenes' cells, once on the teacher's features and once on the cells' mean colour.

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
from lift3d.nets.heads import sample_soft_labels
from lift3d.pipeline.readers.common import nearest_index, to_grid
from lift3d.pipeline.readers.scannet_labels import default_labels

log = logging.getLogger("lift3d")
N_CLASSES = 20  # ScanNet-20


# ----------------------------------------------------------------------------- the evaluation


def folded_prediction(prob, index, lut: np.ndarray, pixels: np.ndarray, image_hw) -> np.ndarray:
    """(H, W) ScanNet-20 prediction (N_CLASSES = "none") of one frame's stored soft labels: the
    bilinear sample at each pixel, its mass summed per ScanNet-20 class through ``lut``, argmax."""
    p, ix = sample_soft_labels(np.asarray(prob), np.asarray(index), pixels, image_hw)
    bins = lut[ix]  # (P, 4k) in 0..N_CLASSES
    flat = (np.arange(len(bins))[:, None] * (N_CLASSES + 1) + bins).ravel()
    score = np.bincount(flat, weights=p.ravel(), minlength=len(bins) * (N_CLASSES + 1))
    return score.reshape(len(bins), N_CLASSES + 1).argmax(1).reshape(image_hw)


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
    lut = np.where(lut == IGNORE_INDEX, N_CLASSES, lut)  # bin N_CLASSES: no ScanNet-20 class ("none")
    index, prob = teacher["soft_labels/index"], teacher["soft_labels/prob"]
    scenes = list(frames.attrs["scenes"])
    scene_index = frames["scene_index"][...]
    source_index = frames["source_index"][...]
    h_img, w_img = frames["rgb"].shape[1:3]
    pixels = np.stack(np.meshgrid(np.arange(h_img), np.arange(w_img), indexing="ij"), -1).reshape(-1, 2)
    conf = np.zeros((N_CLASSES, N_CLASSES + 1), dtype=np.int64)
    done = missing = 0
    cells: dict[int, list] = {}  # scene -> [(label, feature, colour) arrays] per frame
    try:
        for i in range(len(source_index)):
            gt = labels(scenes[scene_index[i]], int(source_index[i]))
            if gt is None:
                missing += 1
                continue
            gt = to_grid(np.asarray(gt), h_img, w_img).astype(np.int64)
            conf += confusion(gt, folded_prediction(prob[i], index[i], lut, pixels, (h_img, w_img)))
            if "features" in teacher:
                cells.setdefault(int(scene_index[i]), []).append(
                    cell_samples(gt, teacher["features"][i], frames["rgb"][i])
                )
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
    info = cell_information(cells, scenes)
    if info:
        log.info(
            "eval teacher %s/%s: 1-NN cell accuracy, trained on %s: teacher features %.3f, mean colour %.3f",
            out["teacher"],
            dataset,
            info["train_scene"],
            info["features"],
            info["colour"],
        )
    return {**out, "evaluated": True, "frames": done, "frames_without_labels": missing, **res, "cell_nn": info}


MAX_CELLS = 20000  # per side of the nearest-neighbour test (a deterministic subsample beyond)


def cell_samples(gt: np.ndarray, features: np.ndarray, rgb: np.ndarray) -> tuple:
    """One frame's teacher cells as (label, feature, mean colour): the label is the most common
    ScanNet-20 class of the labelled pixels whose centre lies in the cell; cells with none are left out."""
    c, h, w = features.shape
    H, W = gt.shape
    cell = nearest_index(H, h)[:, None] * w + nearest_index(W, w)[None, :]  # (H, W) cell of each pixel
    ok = (gt >= 0) & (gt < N_CLASSES)
    votes = np.bincount(cell[ok] * N_CLASSES + gt[ok], minlength=h * w * N_CLASSES).reshape(h * w, N_CLASSES)
    colour = np.stack([np.bincount(cell.ravel(), rgb[..., k].ravel(), h * w) for k in range(3)], 1)
    colour /= np.maximum(np.bincount(cell.ravel(), minlength=h * w), 1)[:, None]
    keep = votes.sum(1) > 0
    feats = np.asarray(features, np.float32).reshape(c, h * w).T
    return votes.argmax(1)[keep], feats[keep], colour[keep].astype(np.float32)


def _nn_accuracy(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray) -> float:
    """Accuracy of the 1-nearest-neighbour (Euclidean) classifier fitted on (xa, ya), on (xb, yb)."""
    a2 = (xa.astype(np.float64) ** 2).sum(1)
    right = 0
    for s in range(0, len(xb), 2048):
        q = xb[s : s + 2048].astype(np.float64)
        d = a2[None, :] - 2.0 * q @ xa.T.astype(np.float64)  # + |q|^2, the same for every candidate
        right += int((ya[d.argmin(1)] == yb[s : s + 2048]).sum())
    return right / len(xb)


def cell_information(cells: dict, scenes: list[str]) -> dict | None:
    """How much the teacher's cell features say about the classes, against the cells' mean colour:
    a 1-nearest-neighbour classifier fitted on the cells of the first scene, tested on the cells
    of every other scene (accuracy). None with fewer than two labelled scenes."""
    if len(cells) < 2:
        return None
    order = sorted(cells)
    side = {k: [np.concatenate(v) for v in zip(*cells[k])] for k in order}
    train = side[order[0]]
    test = [np.concatenate(v) for v in zip(*(side[k] for k in order[1:]))]
    rng = np.random.default_rng(0)

    def cap(arrays):
        n = len(arrays[0])
        keep = np.sort(rng.choice(n, MAX_CELLS, replace=False)) if n > MAX_CELLS else slice(None)
        return [a[keep] for a in arrays]

    (ya, fa, ca), (yb, fb, cb) = cap(train), cap(test)
    return {
        "features": _nn_accuracy(fa, ya, fb, yb),
        "colour": _nn_accuracy(ca, ya, cb, yb),
        "train_scene": scenes[order[0]],
        "train_cells": int(len(ya)),
        "test_cells": int(len(yb)),
    }
