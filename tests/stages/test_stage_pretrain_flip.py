"""2D flip augmentation from the teacher's flip pass, and TensorBoard logging.

The store comes from the real stages with ``teacher.flip_pass: true``; expectations are computed
here from the raw arrays (rgb, intrinsics, pose, points, the teacher's ``*_flip`` arrays) with
numpy, independently of lift3d.train.data's code.
"""

import logging
import sys

import numpy as np
import pytest

from lift3d.train import augment as A
from lift3d.train import data as D
from lift3d.train import pretrain as P
from tests.fixtures.config import pretrain_cfg
from tests.fixtures.stores import open_stores, run_stages

FLIP_ONLY = {"rotate_up": False, "scale": False, "elastic": False, "color_methods": [], "flip_2d": True}
M = np.diag([-1.0, 1.0, 1.0])


def flip_cfg(wd, flip_pass=True, **pretrain) -> dict:
    """The pretraining tests' tiny config, 3 steps, only the 2D flip switched on, the flip pass as asked."""
    cfg = pretrain_cfg(wd, **{"iterations": 3, "augment": dict(FLIP_ONLY), **pretrain})
    cfg["teacher"]["flip_pass"] = flip_pass
    return cfg


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return run_stages(flip_cfg(tmp_path_factory.mktemp("flip")), "frames", "teacher", "points")


# -- geometry without a store -----------------------------------------------------------------
def test_mirrored_frame_projects_to_flipped_pixel_and_keeps_gravity_up():
    H, W, fx, fy, cx, cy = 48, 64, 50.0, 52.0, 30.3, 22.7
    rng = np.random.default_rng(0)
    pix = np.c_[rng.integers(0, H, 300), rng.integers(0, W, 300)]
    depth = rng.uniform(0.5, 4.0, 300)
    cam = np.c_[(pix[:, 1] - cx) / fx, (pix[:, 0] - cy) / fy, np.ones(300)] * depth[:, None]  # d K^-1 [c, r, 1]
    look = (
        A.axis_angle_matrix(np.array([0, 0, 1.0]), 0.4)
        @ A.axis_angle_matrix(np.array([1, 0, 0.0]), -1.9)
        @ A.axis_angle_matrix(np.array([0, 0, 1.0]), 0.15)
    )  # forward-down, rolled 0.15 rad
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = look, [0.7, -0.3, 1.4]
    c2, p2, pose2 = D.mirror_frame(cam.astype(np.float32), pix.astype(np.int32), pose.astype(np.float32), W)
    np.testing.assert_array_equal(p2, np.c_[pix[:, 0], W - 1 - pix[:, 1]])
    # the mirrored point, projected with the flipped image's intrinsics (cx' = W - 1 - cx), is on its pixel
    u = fx * c2[:, 0] / c2[:, 2] + (W - 1 - cx)
    v = fy * c2[:, 1] / c2[:, 2] + cy
    np.testing.assert_allclose(np.c_[v, u], p2, atol=1e-3)
    # gravity frame: the mirror image of the original about a vertical plane (heights unchanged)
    g, g2 = D.to_frame(cam.astype(np.float32), pose.astype(np.float32), "gravity"), D.to_frame(c2, pose2, "gravity")
    np.testing.assert_allclose(g2, g @ M.T, atol=1e-5)
    w, w2 = D.to_frame(cam.astype(np.float32), pose.astype(np.float32), "world"), D.to_frame(c2, pose2, "world")
    np.testing.assert_allclose(w2, w @ M.T, atol=1e-5)
    # keeping the original pose would tilt the heights, since this camera has roll
    assert np.abs(D.to_frame(c2, pose.astype(np.float32), "gravity")[:, 2] - g[:, 2]).max() > 0.05
    assert np.isclose(np.linalg.det(pose2[:3, :3]), 1.0, atol=1e-5)


# -- on the real store ------------------------------------------------------------------------
def test_flipped_frame_against_the_flipped_image(wd):
    cfg = flip_cfg(wd, method="ppnce")
    ds = D.PretrainStream(cfg)
    fr, te, po = open_stores(wd)
    off = po["offsets"][...]
    H, W = fr["rgb"].shape[1:3]
    for i in (0, 4, 9):
        f = ds.read_frame(i, flip=True)
        coords, colors, pixel = (po[n][off[i] : off[i + 1]] for n in ("coords", "colors", "pixel"))
        flipped_rgb = fr["rgb"][i][:, ::-1]
        r, c = f["pixel"][:, 0], f["pixel"][:, 1]
        # the flipped image holds each point's colour at its new pixel, the original at the mirrored column
        np.testing.assert_array_equal(flipped_rgb[r, c], colors)
        np.testing.assert_array_equal(fr["rgb"][i][r, W - 1 - c], colors)
        np.testing.assert_array_equal(f["colors"], colors)
        fx, fy, cx, cy = fr["intrinsics"][i].astype(np.float64)
        x, y, z = (f["coords"][:, k].astype(np.float64) for k in range(3))
        np.testing.assert_allclose(np.c_[fy * y / z + cy, fx * x / z + (W - 1 - cx)], f["pixel"], atol=2e-3)
        np.testing.assert_array_equal(f["coords"][:, 1:], coords[:, 1:])
        np.testing.assert_array_equal(f["features"], te["features_flip"][i])
        assert f["flipped"] and not ds.read_frame(i).get("flipped")
        np.testing.assert_array_equal(ds.read_frame(i)["features"], te["features"][i])
        # gravity frame: the mirror image of the unflipped frame
        pose = fr["pose"][i].astype(np.float64)
        np.testing.assert_allclose(
            D.to_frame(f["coords"], f["pose"], "gravity"), coords.astype(np.float64) @ pose[:3, :3].T @ M.T, atol=1e-4
        )


def taps(x, n, size):
    """Bilinear taps (align_corners=False) of stored pixel x over n cells: [(cell, weight), ...]."""
    t = max((x + 0.5) * n / size - 0.5, 0.0)
    i0 = min(int(np.floor(t)), n - 1)
    return [(i0, 1.0 - (t - i0)), (min(i0 + 1, n - 1), t - i0)]


def test_stream_flips_half_and_targets_come_from_the_flip_pass(wd):
    cfg = flip_cfg(wd, method="soft_ce")
    ds = D.PretrainStream(cfg)
    fr, te, po = open_stores(wd)
    off = po["offsets"][...]
    H, W = fr["rgb"].shape[1:3]
    _, k, hs, ws = te["soft_labels/prob"].shape
    K = len(te.attrs["classes"])
    seen = []
    for b in range(8):
        batch = ds.make_batch(b)
        assert batch["flipped"] == ds.flips(b).tolist()
        dense = P.topk_to_dense(batch["prob"], batch["index_k"], K).numpy()
        for slot, ((_, i), flipped) in enumerate(zip(batch["ids"], batch["flipped"])):
            seen.append(flipped)
            rows = np.flatnonzero(batch["frame"].numpy() == slot)
            pix = batch["pixel"][rows].numpy()
            orig = po["pixel"][off[i] : off[i + 1]]
            cols = W - 1 - pix[:, 1] if flipped else pix[:, 1]  # back in the original image
            assert set(map(tuple, np.c_[pix[:, 0], cols].tolist())) <= set(map(tuple, orig.tolist()))
            pname, iname = (
                ("soft_labels/prob_flip", "soft_labels/index_flip")
                if flipped
                else ("soft_labels/prob", "soft_labels/index")
            )
            for v in rows[:: max(1, len(rows) // 10)]:
                r, c = batch["pixel"][v].tolist()  # the target: the bilinear blend of four cells
                want = np.zeros(K)
                for cr, wr in taps(r, hs, H):
                    for cc, wc in taps(c, ws, W):
                        p = te[pname][i, :, cr, cc].astype(np.float64)
                        np.add.at(want, te[iname][i, :, cr, cc].astype(int), wr * wc * p / p.sum())
                np.testing.assert_allclose(dense[v], want, atol=1e-5)
    assert 0 < sum(seen) < len(seen)  # both flipped and unflipped frames
    # the decisions do not depend on the process count; flip_2d: false turns them off
    halves = [D.PretrainStream(cfg, rank=r, world=2) for r in range(2)]
    for b in range(8):
        assert sum((h.make_batch(b)["flipped"] for h in halves), []) == ds.flips(b).tolist()
    off_cfg = flip_cfg(wd, method="soft_ce", augment={**FLIP_ONLY, "flip_2d": False})
    assert not any(D.PretrainStream(off_cfg).flips(b).any() for b in range(8))


def test_flip_asked_without_a_flip_pass_is_logged_not_silent(wd, caplog):
    cfg = flip_cfg(wd, method="ppnce")
    src = D.open_sources(cfg)
    assert src[0].flip_pass
    src[0].flip_pass = False  # as a cache without the flip pass
    with caplog.at_level(logging.INFO, logger="lift3d"):
        ds = D.PretrainStream(cfg, src)
    assert any("2D flip is OFF" in r.getMessage() and "teacher.flip_pass" in r.getMessage() for r in caplog.records)
    assert not any(ds.make_batch(b)["flipped"][0] for b in range(6))
    with pytest.raises(Exception, match="no flip pass"):
        ds.read_frame(0, flip=True)


def test_identity_ignores_flip_2d_without_a_flip_pass(wd):
    without = flip_cfg(wd, flip_pass=False)
    legacy = flip_cfg(wd, flip_pass=False)
    del legacy["pretrain"]["augment"]["flip_2d"]
    assert P.identity(without) == P.identity(legacy)  # old run folders keep their names
    assert P.run_dir(without) == P.run_dir(legacy)
    on, off = flip_cfg(wd), flip_cfg(wd, augment={**FLIP_ONLY, "flip_2d": False})
    assert P.run_dir(on) != P.run_dir(off)


def test_training_with_flips_and_tensorboard_off_is_said_once(wd, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    cfg = flip_cfg(wd, method="ppnce", run_name="flip-ppnce")
    ds = D.PretrainStream(cfg)
    assert any(ds.flips(b).any() for b in range(3))
    with caplog.at_level(logging.INFO, logger="lift3d"):
        row = P.run(cfg)[0]
    assert row["status"] == "trained" and row["steps"] == 3 and np.isfinite(row["final_loss"])
    said = [r for r in caplog.records if "TensorBoard logging is off" in r.getMessage()]
    assert len(said) == 1 and "not installed" in said[0].getMessage()
    assert not (P.run_dir(cfg) / "tb").exists()


def test_tensorboard_scalars_match_metrics_csv(wd):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (optional)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = flip_cfg(wd, method="soft_ce", run_name="tb-soft", iterations=4)
    P.train(cfg, stop_at=2)  # killed after 2 steps, then resumed
    P.run(cfg)
    d = P.run_dir(cfg)
    rows = [r.split(",") for r in (d / "metrics.csv").read_text().strip().splitlines()[1:]]
    acc = EventAccumulator(str(d / "tb"))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("pretrain/loss")}
    lr = {e.step: e.value for e in acc.Scalars("pretrain/lr")}
    assert sorted(loss) == [int(r[0]) for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert loss[int(r[0])] == pytest.approx(float(r[1]), rel=1e-6)
        assert lr[int(r[0])] == pytest.approx(float(r[2]), rel=1e-5)
