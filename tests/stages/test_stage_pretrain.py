"""Pretraining: data stream, collation, targets, losses going down, refusals, resume.

The stores come from the real stages (frames -> teacher -> points) on a tiny synthetic dataset;
expectations are computed independently from the stores with plain zarr / numpy.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from lift3d.core.store import StoreError
from lift3d.train import augment as A
from lift3d.train import data as D
from lift3d.train import pretrain as P
from tests.fixtures.config import pretrain_cfg
from tests.fixtures.stores import open_stores, run_stages


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return run_stages(pretrain_cfg(tmp_path_factory.mktemp("pre")), "frames", "teacher", "points")


def rot(axis, deg):
    return A.axis_angle_matrix(np.array(axis, float), np.deg2rad(deg))


# -- geometry ---------------------------------------------------------------------------------
def test_gravity_frame_puts_floor_normal_on_z():
    rng = np.random.default_rng(0)
    floor_w = np.c_[rng.uniform(-2, 2, (500, 2)), np.zeros(500)]  # world floor z = 0
    # an OpenCV camera looking forward-down, rolled a little, 1.4 m above the floor
    look = rot([0, 0, 1], 25) @ rot([1, 0, 0], -110) @ rot([0, 0, 1], 8)
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = look, [0.7, -0.3, 1.4]
    cam = ((floor_w - pose[:3, 3]) @ pose[:3, :3]).astype(np.float32)  # R^T (x - t)
    _, _, vt = np.linalg.svd(cam - cam.mean(0))
    assert abs(vt[2] @ [0, 0, 1]) < 0.9  # tilted in the camera frame
    g = D.to_frame(cam, pose.astype(np.float32), "gravity")
    _, _, vt = np.linalg.svd(g - g.mean(0))
    assert abs(vt[2] @ [0, 0, 1]) > 1 - 1e-6  # floor normal along z
    np.testing.assert_allclose(g[:, 2], -1.4, atol=1e-5)  # camera at origin, 1.4 m up
    np.testing.assert_allclose(D.to_frame(cam, pose.astype(np.float32), "world"), floor_w, atol=1e-5)
    np.testing.assert_array_equal(D.to_frame(cam, pose, "camera"), cam)
    # rotation about the up axis keeps heights (z up; -y in the camera frame)
    r = np.random.default_rng(1)
    np.testing.assert_allclose(A.rotate_up(g, "gravity", r)[:, 2], g[:, 2], atol=1e-5)
    np.testing.assert_allclose(A.rotate_up(cam, "camera", r)[:, 1], cam[:, 1], atol=1e-5)


def test_trilinear_exact_on_affine_and_elastic_is_smooth():
    rng = np.random.default_rng(0)
    grid_pts = np.stack(np.meshgrid(*[np.arange(5.0)] * 3, indexing="ij"), -1) * 0.5 + 1.0
    field = grid_pts @ np.array([[1.0, 2.0], [-1.0, 0.5], [3.0, 0.0]]) + 0.25
    q = rng.uniform(1.0, 3.0, (100, 3))
    np.testing.assert_allclose(
        A.trilinear(field, np.ones(3), 0.5, q), q @ np.array([[1.0, 2.0], [-1.0, 0.5], [3.0, 0.0]]) + 0.25, atol=1e-9
    )
    pts = rng.uniform(0, 3, (2000, 3)).astype(np.float32)
    out = A.elastic_distortion(pts, 0.2, 0.4, np.random.default_rng(2))
    disp = out - pts
    assert 0.005 < np.abs(disp).mean() < 0.2
    near = np.linalg.norm(pts[1:] - pts[:-1], axis=1) < 0.05  # close pairs move alike
    if near.any():
        assert np.abs(disp[1:][near] - disp[:-1][near]).mean() < np.abs(disp).mean()


def test_label_cells_hand_computed():
    # H = 48 rows onto h = 2 cells: cell 0 covers pixel centres up to 23, cell 1 from 24
    r, c = D.label_cells(np.array([[0, 0], [23, 31], [24, 32], [47, 63]]), (48, 64), (2, 3))
    assert r.tolist() == [0, 0, 1, 1]
    assert c.tolist() == [0, 1, 1, 2]  # (31.5 * 3 / 64) = 1.48, (32.5 * 3 / 64) = 1.52
    # a cell's own centre pixel (i + 0.5) H / h - 0.5 maps back to cell i
    H, h = 60, 4
    centres = (np.arange(h) + 0.5) * H / h - 0.5
    rr, _ = D.label_cells(np.c_[np.round(centres), np.zeros(h)], (H, 8), (h, 1))
    assert rr.tolist() == list(range(h))


def test_epoch_order_is_a_block_shuffled_permutation():
    o = D.epoch_order(96, 0, 0, 8, 2)
    assert sorted(o.tolist()) == list(range(96))
    assert o.tolist() != list(range(96))
    # pools of 2 blocks: each run of 16 frames comes from at most 2 blocks
    for s in range(0, 96, 16):
        assert len(set((o[s : s + 16] // 8).tolist())) <= 2
    assert not np.array_equal(o, D.epoch_order(96, 0, 1, 8, 2))
    np.testing.assert_array_equal(o, D.epoch_order(96, 0, 0, 8, 2))


# -- stream and collation on the real stores --------------------------------------------------
def test_collation_keeps_voxel_pixel_mapping(wd):
    cfg = pretrain_cfg(wd, method="ppnce", frame="gravity")
    ds = D.PretrainStream(cfg, augment=False)
    fr, te, po = open_stores(wd)
    off = po["offsets"][...]
    batch = ds.make_batch(3)
    ids = batch["ids"]
    assert len(ids) == 2 and batch["coords"].shape[0] == batch["feats"].shape[0] == batch["pixel"].shape[0]
    np.testing.assert_array_equal(batch["coords"][:, 0].numpy(), batch["frame"].numpy())
    assert float(batch["feats"].min()) >= -0.5 and float(batch["feats"].max()) <= 0.5
    for b, (_, i) in enumerate(ids):
        coords, pixel, colors = (po[n][off[i] : off[i + 1]] for n in ("coords", "pixel", "colors"))
        R = fr["pose"][i][:3, :3].astype(np.float64)
        by_pixel = {tuple(p): k for k, p in enumerate(pixel.tolist())}
        m = batch["frame"].numpy() == b
        vox, pix, feats = batch["coords"][m, 1:].numpy(), batch["pixel"][m].numpy(), batch["feats"][m].numpy()
        ks = np.array([by_pixel[tuple(p)] for p in pix.tolist()])
        world_up = coords[ks].astype(np.float64) @ R.T
        np.testing.assert_array_equal(np.floor(world_up / 0.2).astype(int), vox)  # point lies in its voxel
        np.testing.assert_allclose(feats, colors[ks] / 255.0 - 0.5, atol=1e-6)
        # every occupied voxel of the frame is there exactly once
        all_vox = np.unique(np.floor(coords.astype(np.float64) @ R.T / 0.2).astype(int), axis=0)
        assert len(all_vox) == len(vox) == len(np.unique(vox, axis=0))
        np.testing.assert_array_equal(batch["features"][b].numpy(), te["features"][i])


def test_soft_label_target_is_the_bilinear_blend_of_renormalised_cells(wd):
    cfg = pretrain_cfg(wd, method="soft_ce")
    ds = D.PretrainStream(cfg, augment=False)
    fr, te, po = open_stores(wd)
    batch = ds.make_batch(0)
    K = len(te.attrs["classes"])
    dense = P.topk_to_dense(batch["prob"], batch["index_k"], K).numpy()
    H, W = fr["rgb"].shape[1:3]
    _, k, hs, ws = te["soft_labels/prob"].shape
    rng = np.random.default_rng(0)

    def taps(x, n, size):  # align_corners=False: source x' = (x + 0.5) n / size - 0.5, clamped at 0
        t = max((x + 0.5) * n / size - 0.5, 0.0)
        i0 = min(int(np.floor(t)), n - 1)
        return [(i0, 1.0 - (t - i0)), (min(i0 + 1, n - 1), t - i0)]

    for v in rng.choice(len(dense), 25, replace=False):
        i = batch["ids"][int(batch["frame"][v])][1]
        r, c = batch["pixel"][v].tolist()
        want = np.zeros(K)
        for cr, wr in taps(r, hs, H):
            for cc, wc in taps(c, ws, W):
                p = te["soft_labels/prob"][i, :, cr, cc].astype(np.float64)
                idx = te["soft_labels/index"][i, :, cr, cc].astype(int)
                np.add.at(want, idx, wr * wc * p / p.sum())
        np.testing.assert_allclose(dense[v], want, atol=1e-5)
        assert np.isclose(dense[v].sum(), 1.0, atol=1e-5)


def test_workers_give_the_same_batches(wd):
    cfg = pretrain_cfg(wd, method="ppnce")
    a = [b["coords"] for b in D.loader(cfg, start=2, stop=6, num_workers=0)]
    b = [b["coords"] for b in D.loader(cfg, start=2, stop=6, num_workers=2)]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["ppnce", "soft_ce", "ppkd"])
def test_loss_goes_down_on_a_fixed_batch(wd, method):
    cfg = pretrain_cfg(wd, method=method, optimizer="adam", lr=0.003)
    src = D.open_sources(cfg)
    batch = D.PretrainStream(cfg, src, augment=False).make_batch(0)
    learner, opt = P.build(cfg, src)
    p = cfg["pretrain"]
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = P.compute_loss(learner, batch, p, torch.device("cpu"), step=0)  # same pairs each step
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses


def test_shuffle_within_frames_keeps_frames_and_moves_rows():
    frame = torch.tensor([0] * 40 + [1] * 25 + [3] * 35)[
        torch.randperm(100, generator=torch.Generator().manual_seed(1))
    ]
    perm = P.shuffle_within_frames(frame, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(100))  # a permutation
    assert torch.equal(frame[perm], frame)  # every row keeps its frame
    assert (perm == torch.arange(100)).sum() < 10  # about one fixed row per frame by chance


def test_shuffled_pairs_control_breaks_the_pairing_and_only_that(wd, monkeypatch):
    """Same points, the same pixels of each frame: only which pixel meets which point changes."""
    points, pixels = [], []

    def capture(z3d, z2d, temperature):
        points.append(z3d.detach().clone())
        return z3d.sum() * 0.0

    monkeypatch.setattr(P, "ppnce", capture)
    cfg = pretrain_cfg(wd, method="ppnce")
    src = D.open_sources(cfg)
    batch = D.PretrainStream(cfg, src, augment=False).make_batch(0)
    learner, _ = P.build(cfg, src)
    learner.eval()
    sample = learner.upl.sample

    def recording(maps, frame, pix, image_hw):
        pixels.append((frame.clone(), pix.clone()))
        return sample(maps, frame, pix, image_hw)

    monkeypatch.setattr(learner.upl, "sample", recording)
    p = cfg["pretrain"]
    P.compute_loss(learner, batch, p, torch.device("cpu"), step=5)
    P.compute_loss(learner, batch, {**p, "control": "shuffled_pairs"}, torch.device("cpu"), step=5)
    torch.testing.assert_close(points[0], points[1], rtol=0, atol=0)  # the same sampled points
    (fa, pa), (fb, pb) = pixels
    assert torch.equal(fa, fb)  # each point's frame is kept
    for f in fa.unique():  # each frame's pixels are the same multiset ...
        key = lambda px: sorted(map(tuple, px.tolist()))  # noqa: E731
        assert key(pa[fa == f]) == key(pb[fb == f])
    assert (pa == pb).all(1).float().mean() < 0.2  # ... but nearly every point meets another pixel
    with pytest.raises(ValueError, match="control"):
        P.build(pretrain_cfg(wd, control="mixed"), src)


def test_incomplete_or_stale_teacher_is_refused(wd, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(wd, work, ignore=shutil.ignore_patterns("runs", "raw", ".parts"))
    cfg = pretrain_cfg(work)
    grp = zarr.open_group(str(work / "teacher.zarr/efficientnet_lite0/tiny"), mode="a")
    grp.attrs.update({"complete": False})
    with pytest.raises(StoreError, match="lift3d run teacher"):
        P.run(cfg)
    state, why = P.status(cfg)
    assert state != "done" and any("teacher" in w for w in why)
    grp.attrs.update({"complete": True})
    cfg2 = pretrain_cfg(work)
    cfg2["teacher"]["top_k"] = 3  # the cache is now from another teacher configuration
    with pytest.raises(StoreError, match="teacher"):
        D.open_sources(cfg2)


def test_resume_after_kill_matches_straight_run_and_status(wd):
    straight = pretrain_cfg(wd, run_name="straight", method="ppnce")
    assert P.status(straight)[0] == "missing"
    row = P.run(straight)[0]
    assert row["steps"] == 6 and row["status"] == "trained" and np.isfinite(row["final_loss"])
    assert P.status(straight)[0] == "done"
    d = P.run_dir(straight)
    assert (d / "loss.png").stat().st_size > 0 and json.loads((d / "run.json").read_text())["complete"]
    assert len((d / "metrics.csv").read_text().strip().splitlines()) == 7

    killed = pretrain_cfg(wd, run_name="killed", method="ppnce")
    P.train(killed, stop_at=3)  # 'killed' after step 3
    assert P.status(killed)[0] == "out of date"
    row = P.run(killed)[0]  # resumes at step 3
    assert row["status"] == "trained" and row["steps"] == 6
    a = torch.load(d / "model.pt", weights_only=False)["model"]
    b = torch.load(P.run_dir(killed) / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m1 = (d / "metrics.csv").read_text().splitlines()
    m2 = (P.run_dir(killed) / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in m1] == [r.split(",")[:2] for r in m2]
    assert P.run(straight)[0]["status"] == "up to date"  # a re-run is a no-op


def test_run_status_of_a_run_folder(tmp_path):
    """The run-folder verdict pretrain, finetune and distill2d share, case by case."""
    import json

    from lift3d.train.pretrain import run_status

    d = tmp_path / "run"
    assert run_status(d, "r", []) == ("missing", ["r has not been run"], None)
    d.mkdir()
    assert run_status(d, "r", ["x"])[:2] == ("out of date", ["x", "r has not been run"])
    (d / "run.json").write_text(json.dumps({"complete": False, "step": 7}))
    assert run_status(d, "r", [])[:2] == ("out of date", ["r is incomplete (step 7)"])
    (d / "run.json").write_text(json.dumps({"complete": False, "step": 3, "phase": "baseline"}))
    assert run_status(d, "r", [])[:2] == ("out of date", ["r is incomplete (baseline step 3)"])
    (d / "run.json").write_text(json.dumps({"complete": True, "upstream": {"a": 1}}))
    assert run_status(d, "r", [], ({"a": 2}, "was made from other inputs"))[:2] == (
        "out of date",
        ["r was made from other inputs"],
    )
    assert run_status(d, "r", ["y"], ({"a": 1}, "-"))[:2] == ("out of date", ["y"])
    assert run_status(d, "r", [], ({"a": 1}, "-")) == ("done", [], {"complete": True, "upstream": {"a": 1}})
