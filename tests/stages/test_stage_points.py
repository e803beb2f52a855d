"""The points stage end to end: on frames written directly (offsets, re-run, resume after a
kill, changed settings, stale or incomplete input) and after the frames stage on the synthetic
dataset (every point holds its pixel's depth, one point per voxel)."""

import copy

import numpy as np
import pytest
import zarr

from lift3d.core import config as C
from lift3d.core.graph import groups
from lift3d.core.store import GroupWriter, PartWriter, StoreError, open_group
from lift3d.pipeline import frames as F
from lift3d.pipeline import points as P
from tests.fixtures.config import make_cfg, points_cfg
from tests.fixtures.geometry import relift
from tests.fixtures.stores import H, W, write_tiny_frames


# -- on frames written directly --------------------------------------------------------------
def read_all(cfg):
    g = zarr.open_group(str(C.workdir(cfg) / "points.zarr" / "tiny"), mode="r")
    return {k: g[k][...] for k in ("coords", "colors", "pixel", "offsets")}


def test_stage_end_to_end_rerun_and_resume(tmp_path, monkeypatch):
    cfg = points_cfg(tmp_path / "work")
    frames = write_tiny_frames(cfg)
    rows = P.run(cfg)
    assert rows[0]["status"] == "written" and rows[0]["frames"] == 5
    g = open_group(C.workdir(cfg), "points", "tiny")
    fz = open_group(C.workdir(cfg), "frames", "tiny")
    off = g["offsets"][...]
    assert off.dtype == np.int64 and off.shape == (6,) and off[0] == 0 and off[-1] == g["coords"].shape[0]
    assert g["coords"].dtype == np.float32 and g["colors"].dtype == np.uint8 and g["pixel"].dtype == np.int32
    assert off[2] == off[1]  # scene_a frame 1: empty entry
    s = cfg["points"]
    for i, (rgb, depth, intr, proj) in enumerate(frames):
        a, b = off[i], off[i + 1]
        fp = P.lift_frame(rgb, depth, intr, proj, s["voxel_size"], s["min_depth"], s["max_depth"])
        np.testing.assert_array_equal(g["coords"][a:b], fp.coords)
        np.testing.assert_array_equal(g["pixel"][a:b], fp.pixel)
        np.testing.assert_array_equal(g["colors"][a:b], fp.colors)
        pix = g["pixel"][a:b]
        np.testing.assert_allclose(g["coords"][a:b], relift(fz["depth"][i], pix, intr, proj), atol=1e-5)
        np.testing.assert_array_equal(g["colors"][a:b], fz["rgb"][i][pix[:, 0], pix[:, 1]])
    attrs = dict(g.attrs)
    assert attrs["upstream_sha256"] == fz.attrs["config_sha256"] and attrs["scenes"] == ["scene_a", "scene_b"]
    counts = attrs["point_counts"]
    assert counts["pixels"] == 5 * H * W and counts["points"] == off[-1] == rows[0]["points"]
    assert counts["no_depth"] + counts["out_of_range"] + counts["voxel_merged"] + counts["points"] == 5 * H * W
    assert counts["empty_frames"] == 1 and rows[0]["voxel_merged"] == counts["voxel_merged"] > 0
    assert counts["out_of_range"] > 0 and rows[0]["out_of_range"] == counts["out_of_range"]
    clean = read_all(cfg)

    # re-run: a no-op
    assert P.run(cfg)[0]["status"] == "up to date"

    # killed run: scene_a's part done, scene_b's part half-written; the re-run redoes only scene_b
    import shutil

    shutil.rmtree(C.workdir(cfg) / "points.zarr")
    pg = groups(cfg, "points")[0]
    writer = GroupWriter(
        C.workdir(cfg), "points", "tiny", pg.config, fz.attrs["config_sha256"], pg.upstream.lineage_sha256
    )
    writer.prepare_parts()
    settings = {k: float(s[k]) for k in ("voxel_size", "min_depth", "max_depth")}
    P.scene_task(
        cfg["workdir"], "tiny", pg.upstream.lineage_sha256, 0, 3, "scene_a", str(writer.part_path("scene_a")), settings
    )
    junk = PartWriter(writer.part_path("scene_b"), chunk_rows={"coords": 4})
    junk.append(coords=np.ones((7, 3), np.float32), counts=np.array([7], np.int64))
    junk.flush()  # never finished
    calls = []
    real = P.scene_task
    monkeypatch.setattr(P, "scene_task", lambda *a: calls.append(a[5]) or real(*a))
    assert P.run(cfg)[0]["status"] == "written"
    assert calls == ["scene_b"]
    again = read_all(cfg)
    for k in clean:
        np.testing.assert_array_equal(again[k], clean[k])
    assert dict(zarr.open_group(str(writer.path)).attrs)["point_counts"] == counts

    # a changed points setting rewrites; a stale or incomplete frames group is refused
    cfg2 = copy.deepcopy(cfg)
    cfg2["points"]["voxel_size"] = 0.2
    cfg2["rebuild"] = True  # replacing a complete store is asked for
    row = P.run(cfg2)[0]
    assert row["status"] == "written" and row["points"] < counts["points"]
    cfg3 = copy.deepcopy(cfg)
    cfg3["frames"]["chunk_frames"] = 2
    with pytest.raises(StoreError, match="another configuration"):
        P.run(cfg3)
    zarr.open_group(str(C.workdir(cfg) / "frames.zarr" / "tiny"), mode="a").attrs["complete"] = False
    with pytest.raises(StoreError, match="not marked complete"):
        P.run(cfg)


def test_missing_frames_group_is_a_clear_error(tmp_path):
    cfg = points_cfg(tmp_path / "work")
    with pytest.raises(StoreError, match="lift3d run frames"):
        P.run(cfg)


# -- after the frames stage, on the synthetic dataset ------------------------------------------
@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pts")
    cfg = make_cfg(
        wd,
        "datasets.0.scenes=2",
        "datasets.0.frames_per_scene=12",
        "datasets.0.depth_size=[48, 64]",
        "datasets.0.split=all",
        points={"voxel_size": 0.05},
    )
    F.run(cfg)
    rows = P.run(cfg)
    return wd, cfg, rows


def test_stage_points_hold_their_pixels_depth(stage_run):
    wd, cfg, rows = stage_run
    fr = zarr.open_group(str(wd / "frames.zarr" / "synthetic"), mode="r")
    pt = zarr.open_group(str(wd / "points.zarr" / "synthetic"), mode="r")
    n = fr["depth"].shape[0]
    off = pt["offsets"][...]
    assert off.shape == (n + 1,) and off[0] == 0 and (np.diff(off) >= 0).all()
    assert pt["coords"].dtype == np.float32 and pt["colors"].dtype == np.uint8 and pt["pixel"].dtype == np.int32
    assert rows[0]["frames"] == n and rows[0]["points"] == off[-1]
    for i in range(n):
        c, col, pix = (pt[k][off[i] : off[i + 1]] for k in ("coords", "colors", "pixel"))
        assert len(c) > 100
        depth, rgb = fr["depth"][i], fr["rgb"][i]
        fx, fy, cx, cy = fr["intrinsics"][i].astype(np.float64)
        z = depth[pix[:, 0], pix[:, 1]] / 1000.0
        np.testing.assert_allclose(c[:, 2], z, atol=1e-5)
        np.testing.assert_allclose(c[:, 0], (pix[:, 1] - cx) / fx * z, atol=1e-4)
        np.testing.assert_allclose(c[:, 1], (pix[:, 0] - cy) / fy * z, atol=1e-4)
        np.testing.assert_array_equal(col, rgb[pix[:, 0], pix[:, 1]])
        keys = np.floor(c.astype(np.float64) / 0.05).astype(np.int64)
        assert len(np.unique(keys, axis=0)) == len(c)  # one point per occupied voxel


def test_stage_rerun_is_noop_and_refuses_missing_frames(stage_run, tmp_path):
    wd, cfg, _ = stage_run
    assert P.run(cfg)[0]["status"] == "up to date"
    cfg2 = make_cfg(tmp_path)
    with pytest.raises(Exception, match="lift3d run frames"):
        P.run(cfg2)
