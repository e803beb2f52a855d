"""Semantic-segmentation scores from a confusion matrix (rows = ground truth, columns = prediction).

- IoU_c = TP_c / (TP_c + FP_c + FN_c), for every class c that occurs in the ground truth;
- mIoU = the mean of those IoUs (classes absent from the ground truth are left out, not
  counted as 0 or 1: on a small validation split many of the 20 classes never occur);
- mAcc = the mean over the same classes of the per-class recall TP_c / (TP_c + FN_c);
- overall accuracy = sum TP / number of labelled elements.
"""

from __future__ import annotations

import numpy as np

__all__ = ["confusion_matrix", "segmentation_scores", "format_table", "confusion_with_none", "pixel_scores"]


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """(n, n) int64 counts over the elements whose ground truth is a class (not ``ignore_index``)."""
    gt = np.asarray(gt, np.int64).ravel()
    pred = np.asarray(pred, np.int64).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has {gt.size} elements, prediction {pred.size}")
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    if np.any((pred[keep] < 0) | (pred[keep] >= num_classes)):
        raise ValueError(f"predictions outside 0..{num_classes - 1}")
    return np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def segmentation_scores(conf: np.ndarray, names: list[str]) -> dict:
    """Per-class IoU and accuracy, mIoU, mAcc and overall accuracy of a confusion matrix."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    gt, pred = conf.sum(1), conf.sum(0)
    present = gt > 0
    iou = {names[c]: float(tp[c] / (gt[c] + pred[c] - tp[c])) for c in range(len(names)) if present[c]}
    acc = {names[c]: float(tp[c] / gt[c]) for c in range(len(names)) if present[c]}
    total = conf.sum()
    return {
        "miou": float(np.mean(list(iou.values()))) if iou else None,
        "macc": float(np.mean(list(acc.values()))) if acc else None,
        "overall_acc": float(tp.sum() / total) if total else None,
        "iou": iou,
        "acc": acc,
        "classes_present": int(present.sum()),
        "labelled": int(total),
    }


def format_table(scores: dict, title: str = "") -> str:
    """A readable table: one row per class present, then mIoU / mAcc / overall accuracy."""
    lines = [title] if title else []
    width = max([len(n) for n in scores["iou"]] + [8])
    lines.append(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    for name, v in scores["iou"].items():
        lines.append(f"{name:<{width}}  {100 * v:6.1f}  {100 * scores['acc'][name]:6.1f}")
    fmt = lambda v: "   n/a" if v is None else f"{100 * v:6.1f}"  # noqa: E731
    lines.append(f"{'mean':<{width}}  {fmt(scores['miou'])}  {fmt(scores['macc'])}")
    lines.append(
        f"overall accuracy {fmt(scores['overall_acc']).strip()} % over {scores['labelled']:,} labelled "
        f"vertices, {scores['classes_present']} classes present"
    )
    return "\n".join(lines)


def confusion_with_none(gt: np.ndarray, pred: np.ndarray, n: int = 20) -> np.ndarray:
    """(n, n + 1) counts: rows = ground-truth class, columns = predicted class, column n =
    predicted "none". Pixels whose ground truth is ignored are left out."""
    valid = (gt >= 0) & (gt < n)
    p = np.where((pred >= 0) & (pred < n), pred, n)
    return np.bincount(gt[valid] * (n + 1) + p[valid], minlength=n * (n + 1)).reshape(n, n + 1)


def pixel_scores(conf: np.ndarray, names: list[str]) -> dict:
    """IoU per class present, mIoU, coverage and pixel accuracy of a :func:`confusion_with_none` matrix."""
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    gt = conf.sum(1).astype(np.float64)  # includes "none" predictions (misses)
    pred = conf[:, :n].sum(0).astype(np.float64)
    present = gt > 0
    iou = {names[c]: float(tp[c] / (gt[c] + pred[c] - tp[c])) for c in range(n) if present[c]}
    labelled = float(conf.sum())
    return {
        "miou": float(np.mean(list(iou.values()))) if iou else None,
        "iou": iou,
        "classes_present": int(present.sum()),
        "labelled_pixels": int(labelled),
        "coverage": float(conf[:, :n].sum() / labelled) if labelled else None,
        "pixel_accuracy": float(tp.sum() / labelled) if labelled else None,
    }
