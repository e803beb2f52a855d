"""The verdict's colour nearest-neighbour baseline and linear probe, on hand-made scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lift3d.train import baselines as B
from lift3d.train.scenes import IGNORE_INDEX, Scene

torch.set_num_threads(1)


class FakeDataset:
    def __init__(self, scenes):
        self.scenes = {s.name: s for s in scenes}

    def scene(self, name):
        return self.scenes[name]


def scene(name, rgb, labels):
    rgb = np.asarray(rgb, np.uint8)
    return Scene(name, np.zeros((len(rgb), 3), np.float32), rgb, np.asarray(labels, np.int64))


def test_colour_nn_hand_computed():
    red, blue, pink = [250, 0, 0], [0, 0, 250], [250, 120, 120]
    train = scene("a", [red, blue, red], [0, 1, IGNORE_INDEX])
    # val: a red wall (0), a blue floor (1), a pink floor vertex: nearer red -> predicted wall
    val = scene("v", [red, blue, pink, [10, 0, 240]], [0, 1, 1, IGNORE_INDEX])
    res = B.colour_nn(FakeDataset([train, val]), {"a": np.array([0, 1])}, ["v"])
    # class 0: tp 1, fp 1 (the pink floor) -> IoU 1/2; class 1: tp 1, fn 1 -> IoU 1/2
    assert res["iou"] == pytest.approx({"wall": 0.5, "floor": 0.5})
    assert res["miou"] == pytest.approx(0.5) and res["supervised"] == 2
    assert res["overall_acc"] == pytest.approx(2 / 3)


def test_linear_probe_separates_informative_features_and_not_noise(monkeypatch):
    rng = np.random.default_rng(0)
    labels = {n: rng.integers(0, 4, 400) for n in ("t", "v")}
    ds = FakeDataset([scene(n, np.zeros((400, 3)), labels[n]) for n in ("t", "v")])
    sup = {"t": np.arange(0, 400, 5)}  # 80 supervised vertices

    def informative(net, ds_, name, voxel, device):  # class one-hot plus noise, 8 channels
        f = rng.normal(0, 0.3, (400, 8)).astype(np.float32)
        f[np.arange(400), labels[name]] += 2.0
        return f

    monkeypatch.setattr(B, "vertex_features", informative)
    good = B.linear_probe(None, ds, sup, ["v"], 0.05, seed=0)
    assert good["miou"] > 0.95 and good["supervised"] == 80 and good["channels"] == 8

    def noise(net, ds_, name, voxel, device):
        return np.random.default_rng(len(name)).normal(0, 1, (400, 8)).astype(np.float32)

    monkeypatch.setattr(B, "vertex_features", noise)
    bad = B.linear_probe(None, ds, sup, ["v"], 0.05, seed=0)
    assert bad["miou"] < 0.4  # four classes: chance is about 0.14 IoU
