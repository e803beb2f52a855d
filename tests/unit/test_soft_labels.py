"""Faithful soft labels: bilinear sampling at a point's pixel, folding a teacher's classes into
ScanNet-20, leaving the "other" bin out, and the exponential schedule of the paper preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift3d.core.classmaps import IGNORE_INDEX, ade20k150_names, scannet20_names, teacher_to_scannet20
from lift3d.nets.heads import sample_soft_labels
from lift3d.pipeline.teacher import full_distribution
from lift3d.pipeline.teachers.evaluate import folded_prediction
from lift3d.pipeline.teachers.registry import fold_matrix
from lift3d.train.losses import topk_to_dense
from lift3d.train.optim import lr_at
from lift3d.train.pretrain import drop_ignored

torch.set_num_threads(1)

# three classes on a 2 x 2 grid of cells, the whole distribution per cell
CELLS = np.array(
    [
        [[1.0, 0.0], [0.0, 0.5]],  # class 0
        [[0.0, 1.0], [0.0, 0.5]],  # class 1
        [[0.0, 0.0], [1.0, 0.0]],  # class 2
    ],
    np.float32,
)
INDEX = np.broadcast_to(np.arange(3, dtype=np.uint16)[:, None, None], CELLS.shape).copy()


def dense(prob, index, k=3):
    return topk_to_dense(torch.from_numpy(prob), torch.from_numpy(index), k).numpy()


def test_bilinear_blend_hand_computed():
    # a 4 x 4 frame over 2 x 2 cells; pixel (row 1, col 2): source row (1.5) 2/4 - 0.5 = 0.25,
    # source col (2.5) 2/4 - 0.5 = 0.75, so the four cells weigh
    # (0,0) 0.75 * 0.25, (0,1) 0.75 * 0.75, (1,0) 0.25 * 0.25, (1,1) 0.25 * 0.75
    p, ix = sample_soft_labels(CELLS, INDEX, np.array([[1, 2]]), (4, 4))
    got = dense(p, ix)[0]
    want = (
        0.1875 * np.array([1, 0, 0])
        + 0.5625 * np.array([0, 1, 0])
        + 0.0625 * np.array([0, 0, 1])
        + 0.1875 * np.array([0.5, 0.5, 0])
    )
    np.testing.assert_allclose(got, want, atol=1e-6)  # [0.28125, 0.65625, 0.0625]
    # a corner pixel lies before the first cell centre: that cell alone
    p, ix = sample_soft_labels(CELLS, INDEX, np.array([[0, 0]]), (4, 4))
    np.testing.assert_allclose(dense(p, ix)[0], [1, 0, 0], atol=1e-6)


def test_bilinear_matches_torch_interpolate_at_every_pixel():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3, 4)).astype(np.float32)
    prob = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    index = np.broadcast_to(np.arange(5, dtype=np.uint16)[:, None, None], prob.shape).copy()
    H, W = 9, 14
    pix = np.stack(np.meshgrid(np.arange(H), np.arange(W), indexing="ij"), -1).reshape(-1, 2)
    p, ix = sample_soft_labels(prob, index, pix, (H, W))
    ref = F.interpolate(torch.from_numpy(prob)[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(dense(p, ix, 5), ref.permute(1, 2, 0).reshape(-1, 5).numpy(), atol=1e-5)


def test_top_k_cells_are_renormalised_before_blending():
    # top-1 per cell, different classes: each cell's kept class gets its whole weight
    prob = np.array([[[0.5, 0.25]]], np.float32)  # (k=1, 1, 2)
    index = np.array([[[4, 7]]], np.uint16)
    p, ix = sample_soft_labels(prob, index, np.array([[0, 1], [0, 2]]), (1, 4))
    # pixel col 1: source col (1.5) 2/4 - 0.5 = 0.25 -> 0.75 on class 4, 0.25 on class 7
    # pixel col 2: source 0.75 -> 0.25 on class 4, 0.75 on class 7
    got = dense(p, ix, 8)
    np.testing.assert_allclose(got[:, [4, 7]], [[0.75, 0.25], [0.25, 0.75]], atol=1e-6)
    assert np.allclose(got.sum(1), 1.0)


def test_full_distribution_rule():
    assert full_distribution(20, 5) == 20
    assert full_distribution(21, 5) == 21
    assert full_distribution(64, 5) == 64
    assert full_distribution(150, 5) == 5
    assert full_distribution(1000, 3) == 3


def test_ade20k_folding_hand_computed():
    names = ade20k150_names()
    m = fold_matrix(names, "ade20k_scannet20", "test")
    p = torch.zeros(150)
    # chair (19), armchair (30), swivel chair (75) -> ScanNet chair (4); wall (0) -> wall (0);
    # floor (3) -> floor (1); ceiling (5) is NYU40 22, outside ScanNet-20 -> "other" (20)
    p[[19, 30, 75, 5, 0, 3]] = torch.tensor([0.2, 0.1, 0.05, 0.3, 0.25, 0.1])
    got = m @ p
    want = torch.zeros(21)
    want[4], want[0], want[1], want[20] = 0.35, 0.25, 0.1, 0.3
    torch.testing.assert_close(got, want)
    assert m.sum(0).eq(1).all()  # every ADE20K class lands in exactly one bin


def test_folding_refuses_other_class_lists():
    from lift3d.core.errors import TeacherError

    with pytest.raises(TeacherError, match="ADE20K"):
        fold_matrix([f"c{i}" for i in range(150)], "ade20k_scannet20", "/models/x")
    with pytest.raises(TeacherError, match="unknown map"):
        fold_matrix(ade20k150_names(), "coco_scannet20", "/models/x")


def test_scannet20_teachers_map_to_themselves():
    names = scannet20_names()
    np.testing.assert_array_equal(teacher_to_scannet20(names), np.arange(20))
    lut = teacher_to_scannet20(names + ["other"])
    assert lut[20] == IGNORE_INDEX and list(lut[:20]) == list(range(20))


def test_folded_prediction_sums_mass_per_class():
    # teacher classes 0 and 2 both map to ScanNet-20 class 5, class 1 to none: the top-1 class
    # (1, 0.45) would predict none, the folded mass predicts 5 (0.3 + 0.25)
    prob = np.array([0.3, 0.45, 0.25], np.float32)[:, None, None]
    index = np.arange(3, dtype=np.uint16)[:, None, None]
    lut = np.array([5, 20, 5])
    grid = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])  # every pixel of a 2 x 2 frame, row by row
    pred = folded_prediction(prob, index, lut, grid, (2, 2))
    assert pred.tolist() == [[5, 5], [5, 5]]
    pred = folded_prediction(prob, index, np.array([5, 20, 6]), np.array([[0, 0]]), (1, 1))
    assert pred.tolist() == [[20]]  # 0.45 none beats 0.3 and 0.25: a miss


def test_other_bin_is_left_out_and_rest_renormalised():
    target = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    logits = torch.arange(9.0).reshape(3, 3)
    lg, t = drop_ignored(logits, target, 2)
    torch.testing.assert_close(t, torch.tensor([[0.4, 0.6, 0.0], [0.5, 0.5, 0.0]]))  # row 1 is all "other"
    torch.testing.assert_close(lg, logits[[0, 2]])
    lg, t = drop_ignored(logits, target, None)
    assert t is target and lg is logits


def test_exponential_schedule_hand_computed():
    p = {"lr": 0.5, "iterations": 100, "schedule": "exponential", "gamma": 0.9}
    assert lr_at(p, 0) == pytest.approx(0.5)
    assert lr_at(p, 3) == pytest.approx(0.5 * 0.729)
    assert lr_at(p, 250) == pytest.approx(0.5 * 0.9**100)  # held after the last step
    with pytest.raises(ValueError, match="gamma"):
        lr_at({**p, "gamma": 1.5}, 1)
    assert math.isclose(lr_at({**p, "gamma": 1.0}, 50), 0.5)


def test_teacher_cells_hand_computed():
    from lift3d.pipeline.teachers.evaluate import _nn_accuracy, cell_samples

    # 4 x 4 labels over 2 x 2 cells (2 x 2 pixels each); cell (1, 1) has no labelled pixel
    gt = np.array([[3, 3, 1, 1], [3, 5, 1, 255], [2, 2, 255, 255], [2, 4, 255, 255]])
    feats = np.arange(8, dtype=np.float32).reshape(2, 2, 2)  # 2 channels
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2, :2] = 10
    rgb[0, 0] = 50  # cell (0, 0) mean red/green/blue = (50 + 10 * 3) / 4 = 20
    y, f, c = cell_samples(gt, feats, rgb)
    assert y.tolist() == [3, 1, 2]  # majority per cell; cell 3 left out
    np.testing.assert_array_equal(f, [[0, 4], [1, 5], [2, 6]])
    np.testing.assert_allclose(c[0], [20, 20, 20])
    # 1-NN: train points 0 -> class 0, 10 -> class 1; queries 2 (class 0), 7 (class 0: wrong), 9 (class 1)
    acc = _nn_accuracy(
        np.array([[0.0], [10.0]]), np.array([0, 1]), np.array([[2.0], [7.0], [9.0]]), np.array([0, 0, 1])
    )
    assert acc == pytest.approx(2 / 3)
