"""Does vertex colour alone name the class in the synthetic rooms? A 1-nearest-neighbour classifier on colour.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/colour_baseline.py [--seed 0 --train 4 --val 6 --points 20]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/colour_baseline.py --data DIR   # an already generated dataset

Generates ``train + val`` rooms with the default generator options (or reads ``--data``), then, from each
training room's ``<scene>_vh_clean_2.ply`` / ``<scene>_vh_clean_2.labels.ply``, draws ``--points`` random
vertices that carry a ScanNet-20 label (NYU40 -> ScanNet-20 with lift3d.core.classmaps.nyu40_to_scannet20).
A 1-NN classifier on their RGB colours labels every benchmark vertex of the validation rooms (the rooms after
the training ones). Reports mIoU (over the classes present in the validation rooms), mAcc and overall accuracy
for the draw ``--seed`` and the mean and spread over ``--draws`` draws, plus per-class IoU of the first draw;
for reference also the majority class of the same training vertices and a 1-NN on ``--dense`` vertices per room.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lift3d.core.classmaps import nyu40_to_scannet20, scannet20_names
from lift3d.pipeline.readers.scannet_labels import read_labelled_mesh
from lift3d.pipeline.synthetic import generate


def load_rooms(root: Path, scenes: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rgb float (V, 3), ScanNet-20 label (V,)) of each scene's benchmark-labelled vertices."""
    lut = nyu40_to_scannet20()
    out = []
    for s in scenes:
        _, rgb, nyu = read_labelled_mesh(root / "scans" / s)
        lab = lut[nyu]
        keep = lab != 255
        out.append((rgb[keep].astype(np.float64), lab[keep]))
    return out


def nn_predict(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """1-nearest-neighbour labels (Euclidean in RGB; ties go to the first training point)."""
    pred = np.empty(len(x), np.int64)
    sq = (train_x**2).sum(1)
    for a in range(0, len(x), chunk):
        xb = x[a : a + chunk]
        d = sq[None, :] - 2 * xb @ train_x.T
        pred[a : a + chunk] = train_y[np.argmin(d, 1)]
    return pred


def scores(gt: np.ndarray, pred: np.ndarray, n_classes: int = 20) -> dict:
    """mIoU and mAcc over the classes present in ``gt`` (percent), overall accuracy, per-class IoU."""
    conf = np.bincount(gt * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(conf).astype(np.float64)
    present = conf.sum(1) > 0
    iou = tp / np.maximum(conf.sum(1) + conf.sum(0) - tp, 1)
    acc = tp / np.maximum(conf.sum(1), 1)
    names = scannet20_names()
    return {
        "miou": 100 * iou[present].mean(),
        "macc": 100 * acc[present].mean(),
        "oa": 100 * tp.sum() / conf.sum(),
        "iou": {names[c]: round(100 * iou[c], 1) for c in np.flatnonzero(present)},
    }


def draw(rooms_train, points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(colours, labels) of ``points`` random labelled vertices per training room (draw ``seed``)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for rgb, lab in rooms_train:
        pick = np.sort(rng.choice(len(lab), min(points, len(lab)), replace=False))
        xs.append(rgb[pick]), ys.append(lab[pick])
    return np.concatenate(xs), np.concatenate(ys)


def colour_baseline(rooms_train, rooms_val, points: int, seed: int) -> dict:
    """Train on ``points`` random labelled vertices per training room (draw ``seed``), score on the val rooms."""
    tx, ty = draw(rooms_train, points, seed)
    vx = np.concatenate([r for r, _ in rooms_val])
    vy = np.concatenate([lab for _, lab in rooms_val])
    return scores(vy, nn_predict(tx, ty, vx))


def majority_baseline(rooms_train, rooms_val, points: int, seed: int) -> dict:
    """Every val vertex gets the most frequent class among the same training vertices (no colour at all)."""
    _, ty = draw(rooms_train, points, seed)
    vy = np.concatenate([lab for _, lab in rooms_val])
    return scores(vy, np.full(len(vy), np.bincount(ty).argmax()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="generator seed and first draw")
    ap.add_argument("--train", type=int, default=4, help="training rooms (the first ones)")
    ap.add_argument("--val", type=int, default=6, help="validation rooms (the next ones)")
    ap.add_argument("--points", type=int, default=20, help="labelled vertices per training room")
    ap.add_argument("--draws", type=int, default=10, help="draws of the training vertices for the spread")
    ap.add_argument("--dense", type=int, default=500, help="also: 1-NN on this many vertices per room (0: skip)")
    ap.add_argument("--data", type=Path, default=None, help="an already generated dataset (else generated here)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    n = a.train + a.val
    scenes = [f"scene{i:04d}_00" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        root = a.data
        if root is None:
            t0 = time.perf_counter()
            root = generate(Path(tmp) / "syn", scenes=n, seed=a.seed)
            print(f"generated {n} rooms (seed {a.seed}) in {time.perf_counter() - t0:.1f} s")
        rooms = load_rooms(root, scenes)
    tr, va = rooms[: a.train], rooms[a.train :]
    first = colour_baseline(tr, va, a.points, a.seed)
    runs = [first] + [colour_baseline(tr, va, a.points, a.seed + k) for k in range(1, a.draws)]
    res = {
        "train_rooms": a.train,
        "val_rooms": a.val,
        "points_per_room": a.points,
        "val_vertices": int(sum(len(lab) for _, lab in va)),
        "draw": {k: round(first[k], 1) for k in ("miou", "macc", "oa")},
        "per_class_iou": first["iou"],
        "draws": a.draws,
        "mean": {k: round(float(np.mean([r[k] for r in runs])), 1) for k in ("miou", "macc", "oa")},
        "std": {k: round(float(np.std([r[k] for r in runs])), 1) for k in ("miou", "macc", "oa")},
    }
    d, m, s = res["draw"], res["mean"], res["std"]
    n_val = res["val_vertices"]
    print(f"colour 1-NN, {a.points} vertices x {a.train} train rooms -> {a.val} val rooms ({n_val} vertices)")
    print(f"  draw {a.seed}: mIoU {d['miou']:.1f}  mAcc {d['macc']:.1f}  OA {d['oa']:.1f} %")
    print(
        f"  {a.draws} draws: mIoU {m['miou']:.1f} ± {s['miou']:.1f}  mAcc {m['macc']:.1f} ± {s['macc']:.1f}  "
        f"OA {m['oa']:.1f} ± {s['oa']:.1f} %"
    )
    print("  per-class IoU (draw %d): %s" % (a.seed, json.dumps(first["iou"])))
    maj = majority_baseline(tr, va, a.points, a.seed)
    res["majority_class"] = {k: round(maj[k], 1) for k in ("miou", "macc", "oa")}
    print(f"  reference, majority class of the same vertices: mIoU {maj['miou']:.1f}  OA {maj['oa']:.1f} %")
    if a.dense:
        dense = colour_baseline(tr, va, a.dense, a.seed)
        res["dense"] = {"points_per_room": a.dense, **{k: round(dense[k], 1) for k in ("miou", "macc", "oa")}}
        print(
            f"  reference, 1-NN on {a.dense} vertices per training room: mIoU {dense['miou']:.1f}  "
            f"mAcc {dense['macc']:.1f}  OA {dense['oa']:.1f} %"
        )
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    return res


if __name__ == "__main__":
    main()
