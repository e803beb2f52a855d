"""``lift3d eval teacher``: the teacher's 2D pseudo-label mIoU against ground-truth 2D labels.

For every frame of ``frames.zarr/<dataset>`` that has a ground-truth label image:

- prediction: the top-1 class of ``teacher.zarr/<teacher>/<dataset>/soft_labels/index``
  (index 0 = most probable), mapped to ScanNet-20 with
  :func:`lift3d.classmaps.teacher_to_scannet20` (a class with no ScanNet-20 counterpart
  predicts "none"), brought to the stored H x W by the DESIGN cell mapping: stored pixel
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

The loaders here are small and self-contained (pipeline/scannet_labels.py did not exist when
this was written); ``eval_teacher(..., labels=fn)`` takes any other source of label images.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from lift3d.classmaps import IGNORE_INDEX, nyu40_to_scannet20, scannet20_names, teacher_to_scannet20
from lift3d.config import workdir as get_workdir
from lift3d.stages import groups
from lift3d.store import open_group
from pipeline.scannet_labels import read_label_map

log = logging.getLogger("lift3d")

N_CLASSES = 20
LABELS_TSV = "scannetv2-labels.combined.tsv"
SCANNET_KINDS = ("scannet", "synthetic")  # datasets in ScanNet's raw layout (2D labels included)


# ----------------------------------------------------------------------------- loaders

def load_label_map(tsv: str | Path) -> np.ndarray:
    """ScanNet label id -> NYU40 id (0 = unknown) as an int64 lookup table."""
    tsv = Path(tsv)
    if not tsv.is_file():
        raise FileNotFoundError(f"{tsv} not found: ScanNet's label table (id -> nyu40id) is needed "
                                f"to read 2D labels")
    pairs = read_label_map(tsv)  # the shared tsv parser (column checks, blank rows)
    lut = np.zeros(max(pairs, default=0) + 1, dtype=np.int64)
    for sid, nyu in pairs.items():
        if not 0 <= nyu <= 40:
            raise ValueError(f"{tsv}: id {sid} has nyu40id {nyu}, outside 0..40")
        lut[sid] = nyu
    return lut


def _decode_png16(data: bytes, where: str) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2:
        raise ValueError(f"{where}: not a single-channel label PNG")
    return img


class ScanNetLabels:
    """Ground-truth ScanNet-20 label images of a dataset in ScanNet's raw layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        tsv = self.root / LABELS_TSV
        if not tsv.is_file() and (self.root.parent / LABELS_TSV).is_file():
            tsv = self.root.parent / LABELS_TSV
        self.id_to_nyu = load_label_map(tsv)
        self.nyu_to_20 = nyu40_to_scannet20(IGNORE_INDEX)
        self._zips: dict[str, zipfile.ZipFile | None] = {}

    def available(self) -> bool:
        return (self.root / "scans").is_dir()

    def _zip(self, scene: str):
        if scene not in self._zips:
            p = self.root / "scans" / scene / f"{scene}_2d-label-filt.zip"
            self._zips[scene] = zipfile.ZipFile(p) if p.is_file() else None
        return self._zips[scene]

    def raw(self, scene: str, frame: int) -> np.ndarray | None:
        """The ScanNet label ids of one frame, or None when it has no label image."""
        name = f"label-filt/{frame}.png"
        folder = self.root / "scans" / scene / name
        if folder.is_file():
            return _decode_png16(folder.read_bytes(), str(folder))
        zf = self._zip(scene)
        if zf is None:
            return None
        try:
            data = zf.read(name)
        except KeyError:
            return None
        return _decode_png16(data, f"{zf.filename}:{name}")

    def __call__(self, scene: str, frame: int) -> np.ndarray | None:
        """ScanNet-20 index per pixel (IGNORE_INDEX where none), or None without a label image."""
        ids = self.raw(scene, frame)
        if ids is None:
            return None
        ids = ids.astype(np.int64)
        nyu = np.where(ids < len(self.id_to_nyu), self.id_to_nyu[np.minimum(ids, len(self.id_to_nyu) - 1)], 0)
        return self.nyu_to_20[nyu]

    def close(self):
        for zf in self._zips.values():
            if zf is not None:
                zf.close()


# ----------------------------------------------------------------------------- geometry & metrics

def nearest_index(n_dst: int, n_src: int) -> np.ndarray:
    """For each destination pixel 0..n_dst-1, the source cell whose area holds its centre when
    both grids span the same extent (align_corners = False): floor((d + 0.5) n_src / n_dst)."""
    d = np.arange(n_dst, dtype=np.float64)
    return np.minimum(np.floor((d + 0.5) * n_src / n_dst).astype(np.int64), n_src - 1)


def to_grid(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resample a 2D map to h x w with :func:`nearest_index` along both axes."""
    return img[nearest_index(h, img.shape[0])[:, None], nearest_index(w, img.shape[1])[None, :]]


def confusion(gt: np.ndarray, pred: np.ndarray, n: int = N_CLASSES) -> np.ndarray:
    """(n, n + 1) counts: rows = ground-truth class, columns = predicted class, column n =
    predicted "none". Pixels whose ground truth is ignored are left out."""
    valid = (gt >= 0) & (gt < n)
    p = np.where((pred >= 0) & (pred < n), pred, n)
    return np.bincount(gt[valid] * (n + 1) + p[valid], minlength=n * (n + 1)).reshape(n, n + 1)


def scores(conf: np.ndarray, names: list[str]) -> dict:
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    gt = conf.sum(1).astype(np.float64)          # includes "none" predictions (misses)
    pred = conf[:, :n].sum(0).astype(np.float64)
    present = gt > 0
    iou = {names[c]: float(tp[c] / (gt[c] + pred[c] - tp[c])) for c in range(n) if present[c]}
    labelled = float(conf.sum())
    return {"miou": float(np.mean(list(iou.values()))) if iou else None, "iou": iou,
            "classes_present": int(present.sum()), "labelled_pixels": int(labelled),
            "coverage": float(conf[:, :n].sum() / labelled) if labelled else None,
            "pixel_accuracy": float(tp.sum() / labelled) if labelled else None}


# ----------------------------------------------------------------------------- the evaluation

def default_labels(entry: dict, wd: Path) -> Callable | None:
    if entry["kind"] not in SCANNET_KINDS:
        return None
    root = Path(entry["root"]).expanduser() if entry.get("root") else Path(wd) / "raw" / entry["name"]
    if not (root / "scans").is_dir():
        return None
    return ScanNetLabels(root)


def eval_teacher(cfg: dict, dataset: str, labels: Callable | None = None) -> dict:
    """mIoU of the teacher's top-1 pseudo-labels (ScanNet-20) against the dataset's 2D labels.

    ``labels(scene, source_index)`` -> ScanNet-20 index per pixel (any size; IGNORE_INDEX or any value outside 0..19
    = unlabelled) or None; by default ScanNet's label-filt PNGs for ScanNet-layout datasets.
    """
    wd = get_workdir(cfg)
    matches = [g for g in groups(cfg, "teacher") if g.config["dataset"]["name"] == dataset]
    if not matches:
        raise KeyError(f"dataset {dataset!r} is not configured; datasets: "
                       f"{', '.join(d['name'] for d in cfg['datasets'])}")
    g = matches[0]
    entry = g.config["dataset"]
    out = {"dataset": dataset, "teacher": cfg["teacher"]["name"], "kind": entry["kind"]}
    # the stores first: a missing or stale cache is the error to report, not missing labels
    frames = open_group(wd, "frames", g.upstream.path, expect_lineage=g.upstream.lineage_sha256)
    teacher = open_group(wd, "teacher", g.path, expect_lineage=g.lineage_sha256)
    own = labels is None
    labels = labels or default_labels(entry, wd)
    if labels is None:
        return {**out, "evaluated": False,
                "reason": f"no ground-truth 2D labels for kind {entry['kind']!r} (ScanNet layout with "
                          f"scans/<scene>/<scene>_2d-label-filt.zip needed)"}
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
            top1 = lut[index[i, 0].astype(np.int64)]          # (hs, ws) ScanNet-20 or IGNORE_INDEX
            pred = top1[rows[:, None], cols[None, :]]
            conf += confusion(gt, pred)
            done += 1
    finally:
        if own and hasattr(labels, "close"):
            labels.close()
    res = scores(conf, scannet20_names())
    log.info("eval teacher %s/%s: %d frames, mIoU %s over %d classes, coverage %s", out["teacher"],
             dataset, done, res["miou"], res["classes_present"], res["coverage"])
    return {**out, "evaluated": True, "frames": done, "frames_without_labels": missing, **res}
