"""Points stage: geometry against independent computations, voxel down-sampling against a
brute-force reference, and the stage end to end (offsets, re-run, resume, stale input)."""

import copy
import math

import numpy as np
import pytest
import zarr

from lift3d.core import config as C
from lift3d.core.graph import groups
from lift3d.core.store import GroupWriter, PartWriter, StoreError, open_group
from lift3d.pipeline import points as P
from lift3d.pipeline.frames import templates as frame_templates

# -- an independent ray caster: axis-aligned boxes in the camera frame -------------------------
ROOM = (np.array([-3.0, -1.5, -4.0]), np.array([3.5, 1.2, 5.0]))  # seen from inside
BOX_LEFT = (np.array([-1.6, -0.2, 1.5]), np.array([-0.9, 0.6, 2.2]))  # left of the camera (x < 0)
BOX_UP = (np.array([0.1, -1.2, 2.0]), np.array([0.8, -0.7, 2.6]))  # above it (y < 0: up)


def cast(dirs):
    """Ray parameter t of the first hit from the origin along dirs (n, 3), and the hit's id
    (0 room, 1 left box, 2 upper box)."""
    dirs = np.asarray(dirs, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = ROOM
        t_exit = np.where(dirs > 0, hi / dirs, np.where(dirs < 0, lo / dirs, np.inf)).min(axis=1)
        t, hit = t_exit.copy(), np.zeros(len(dirs), int)
        for k, (blo, bhi) in enumerate((BOX_LEFT, BOX_UP), start=1):
            t1, t2 = blo / dirs, bhi / dirs
            tn = np.nanmax(np.minimum(t1, t2), axis=1)
            tf = np.nanmin(np.maximum(t1, t2), axis=1)
            hit_k = (tn <= tf) & (tn > 0) & (tn < t)
            t[hit_k], hit[hit_k] = tn[hit_k], k
    return t, hit


def pano_dirs(h, w):
    """Unit rays of an equirectangular image, written in camera terms: azimuth a grows to the
    right (0 at the centre column), elevation e grows downwards (the stores' (docs/stores.md) u = -a, v = e)."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    a = 2 * np.pi * (c + 0.5) / w - np.pi
    e = np.pi * (r + 0.5) / h - np.pi / 2
    return np.stack([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)], -1)


def pinhole_dirs(h, w, k):
    fx, fy, cx, cy = k
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(c - cx) / fx, (r - cy) / fy, np.ones((h, w))], -1)


def to_mm(t):
    return np.round(np.asarray(t) * 1000).clip(0, 65535).astype(np.uint16)


def relift(depth, pixel, intr, projection):
    """Independent re-lift of each point from the depth at its stored pixel."""
    h, w = depth.shape
    r, c = pixel[:, 0], pixel[:, 1]
    d = depth[r, c].astype(np.float64) / 1000.0
    rays = pano_dirs(h, w) if projection == 1 else pinhole_dirs(h, w, [float(v) for v in intr])
    return rays[r, c] * d[:, None]


# -- pinhole ---------------------------------------------------------------------------------
def test_pinhole_fronto_parallel_plane_by_hand():
    h, w, k = 32, 40, np.array([50.0, 52.0, 19.3, 15.8], np.float32)
    depth = np.full((h, w), 2000, np.uint16)
    rgb = np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3).astype(np.uint8)
    fp = P.lift_frame(rgb, depth, k, 0, voxel_size=0.001, min_depth=0.1, max_depth=6.0)
    assert fp.coords.dtype == np.float32 and fp.colors.dtype == np.uint8 and fp.pixel.dtype == np.int32
    assert len(fp.coords) == h * w and fp.voxel_merged == 0 and fp.no_depth == 0
    np.testing.assert_allclose(fp.coords[:, 2], 2.0, rtol=0, atol=1e-6)
    # row-major order; first and last pixel by hand: x = (c - cx) z / fx, y = (r - cy) z / fy
    assert fp.pixel[0].tolist() == [0, 0] and fp.pixel[-1].tolist() == [31, 39]
    np.testing.assert_allclose(fp.coords[0], [-0.772, -0.6076923, 2.0], atol=1e-5)
    np.testing.assert_allclose(fp.coords[-1], [0.788, 0.5846154, 2.0], atol=1e-5)
    np.testing.assert_array_equal(fp.colors, rgb[fp.pixel[:, 0], fp.pixel[:, 1]])


def look_at(eye, target):
    """Camera-to-world pose of an OpenCV camera at eye looking at target (world z up)."""
    f = np.asarray(target, float) - eye
    f /= np.linalg.norm(f)
    right = np.cross(f, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, f], 1)
    pose[:3, 3] = eye
    return pose


def test_pinhole_posed_floor_plane_lands_on_the_floor():
    h, w, k = 48, 64, (60.0, 60.0, 31.5, 23.5)
    pose = look_at(np.array([0.3, -0.2, 1.5]), [1.0, 6.0, 0.5])
    dirs = pinhole_dirs(h, w, k).reshape(-1, 3) @ pose[:3, :3].T  # world directions, z_cam = 1
    with np.errstate(divide="ignore"):
        t = np.where(dirs[:, 2] < 0, -pose[2, 3] / dirs[:, 2], 0.0)  # hit z_w = 0; t = z_cam
    depth = to_mm(t).reshape(h, w)
    rgb = np.zeros((h, w, 3), np.uint8)
    fp = P.lift_frame(rgb, depth, np.array(k, np.float32), 0, 0.05, 0.1, 6.0)
    world = fp.coords.astype(np.float64) @ pose[:3, :3].T + pose[:3, 3]
    assert len(world) > 100
    np.testing.assert_allclose(world[:, 2], 0.0, atol=2e-3)  # on the floor (mm quantisation)
    mm = depth.reshape(-1)
    assert fp.no_depth == int((mm == 0).sum()) > 0  # sky above the horizon
    assert fp.out_of_range == int((mm > 6000).sum()) > 0
    np.testing.assert_allclose(fp.coords, relift(depth, fp.pixel, k, 0), atol=1e-5)
    # each survivor is alone in its voxel
    vox = np.floor(fp.coords.astype(np.float64) / 0.05)
    assert len(np.unique(vox, axis=0)) == len(vox)


def test_depth_range_counts_and_boundaries():
    depth = np.array([[0, 50, 99, 100, 3000, 6000, 6001, 65535]], np.uint16)
    fp = P.lift_frame(np.zeros((1, 8, 3), np.uint8), depth, np.array([10, 10, 3.5, 0], np.float32), 0, 1e-4, 0.1, 6.0)
    assert fp.no_depth == 1 and fp.out_of_range == 4 and fp.voxel_merged == 0
    assert fp.pixel[:, 1].tolist() == [3, 4, 5]  # both ends kept
    np.testing.assert_allclose(fp.coords[:, 2], [0.1, 3.0, 6.0], atol=1e-6)
    assert fp.counts()["pixels"] == 8


def test_bad_intrinsics_and_projection_are_errors():
    d = np.full((4, 5), 1000, np.uint16)
    rgb = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="intrinsics"):
        P.lift_frame(rgb, d, np.full(4, np.nan, np.float32), 0, 0.02, 0.1, 6)
    with pytest.raises(ValueError, match="projection"):
        P.lift_frame(rgb, d, np.ones(4, np.float32), 2, 0.02, 0.1, 6)


# -- panorama --------------------------------------------------------------------------------
PH, PW = 96, 192
PK = (70.0, 70.0, 59.5, 44.5)
PIN_H, PIN_W = 90, 120


def render_pano():
    t, hit = cast(pano_dirs(PH, PW).reshape(-1, 3))  # unit rays: t = distance
    return to_mm(t).reshape(PH, PW), hit.reshape(PH, PW)


def render_pinhole():
    t, hit = cast(pinhole_dirs(PIN_H, PIN_W, PK).reshape(-1, 3))  # z = 1 rays: t = z
    return to_mm(t).reshape(PIN_H, PIN_W), hit.reshape(PIN_H, PIN_W)


def agreement(coords, pin_depth, pin_hit):
    """Project panorama points into the pinhole view; compare z with the pinhole's depth there."""
    fx, fy, cx, cy = PK
    z = coords[:, 2]
    front = z > 0.2
    c = np.round(fx * coords[front, 0] / z[front] + cx).astype(int)
    r = np.round(fy * coords[front, 1] / z[front] + cy).astype(int)
    inside = (c >= 0) & (c < PIN_W) & (r >= 0) & (r < PIN_H)
    zp = pin_depth[r[inside], c[inside]] / 1000.0
    err = np.abs(z[front][inside] - zp)
    return err, pin_hit[r[inside], c[inside]]


def test_panorama_agrees_with_pinhole_view_of_an_asymmetric_scene():
    pano, pano_hit = render_pano()
    pin, pin_hit = render_pinhole()
    nan4 = np.full(4, np.nan, np.float32)
    fp = P.lift_frame(np.zeros((PH, PW, 3), np.uint8), pano, nan4, 1, 1e-4, 0.1, 20.0)
    assert len(fp.coords) == PH * PW  # the room is closed
    # every point: the depth at its pixel re-lifted, and the distance along its ray
    np.testing.assert_allclose(fp.coords, relift(pano, fp.pixel, nan4, 1), atol=1e-5)
    dist = np.linalg.norm(fp.coords.astype(np.float64), axis=1)
    t, _ = cast(fp.coords / dist[:, None])
    np.testing.assert_allclose(dist, t, atol=2e-3)
    # conventions: the left box shows left of the centre column, the upper box in the top half
    rows, cols = np.nonzero(pano_hit == 1)
    assert cols.max() < PW // 2 and rows.mean() > PH / 2 - 10
    rows, cols = np.nonzero(pano_hit == 2)
    assert rows.max() < PH // 2 and cols.min() >= PW // 2
    # against the pinhole view: same surfaces, the two boxes included
    err, hit = agreement(fp.coords, pin, pin_hit)
    assert len(err) > 1000
    assert np.median(err) < 0.01 and np.mean(err < 0.1) > 0.97  # misses: grazing walls, edges
    for box in (1, 2):
        assert (hit == box).sum() > 20 and np.median(err[hit == box]) < 0.01


@pytest.mark.parametrize("flip", ["columns", "rows"])
def test_a_mirrored_panorama_mapping_would_be_caught(flip):
    """The agreement check has teeth: lifting a mirrored panorama breaks it."""
    pano, _ = render_pano()
    pin, pin_hit = render_pinhole()
    bad = pano[:, ::-1] if flip == "columns" else pano[::-1]
    fp = P.lift_frame(
        np.zeros((PH, PW, 3), np.uint8), np.ascontiguousarray(bad), np.full(4, np.nan), 1, 1e-4, 0.1, 20.0
    )
    err, hit = agreement(fp.coords, pin, pin_hit)
    assert np.mean(err < 0.1) < 0.9 and all(np.median(err[hit == b]) > 0.5 for b in (1, 2))


def test_panorama_pixel_centres_by_hand():
    h, w = 4, 8
    rays = P.pixel_rays(h, w, None, 1).reshape(3, h, w)
    # pixel (row 1, col 2) by the formulas of docs/stores.md, then (x_cam, y_cam, z_cam) = (-y, -z, x)
    u = math.pi - 2 * math.pi * 2.5 / 8
    v = math.pi * 1.5 / 4 - math.pi / 2
    x, y, z = math.cos(v) * math.cos(u), math.cos(v) * math.sin(u), -math.sin(v)
    np.testing.assert_allclose(rays[:, 1, 2], [-y, -z, x], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rays, axis=0), 1.0, atol=1e-6)


# -- voxel down-sampling vs brute force ------------------------------------------------------
def brute_force(coords, voxel):
    first = {}
    for i, p in enumerate(coords.tolist()):
        first.setdefault(tuple(math.floor(c / voxel) for c in p), i)
    return sorted(first.values())


@pytest.mark.parametrize("method", ["sort", "unique"])
def test_voxel_downsample_matches_brute_force(method):
    rng = np.random.default_rng(1)
    coords = rng.uniform(-0.4, 0.6, (4000, 3)).astype(np.float32)
    coords[:300] = (rng.integers(-8, 12, (300, 3)) * 0.05).astype(np.float32)  # on voxel faces
    coords[300:600] = coords[rng.integers(0, 300, 300)]  # exact duplicates
    keep = P.voxel_downsample(coords, 0.05, method)
    assert keep.tolist() == brute_force(coords, 0.05)
    assert P.voxel_downsample(coords[:0], 0.05, method).shape == (0,)


def test_voxel_downsample_wide_range_falls_back():
    rng = np.random.default_rng(2)
    coords = rng.uniform(-1000, 1000, (500, 3)).astype(np.float32)
    coords[250:] = coords[:250]
    for method in ("sort", "unique"):
        assert P.voxel_downsample(coords, 1e-6, method).tolist() == brute_force(coords, 1e-6)


def test_lift_frame_keeps_smallest_pixel_per_voxel():
    rng = np.random.default_rng(3)
    h, w, k = 24, 30, (30.0, 30.0, 14.5, 11.5)
    depth = rng.integers(500, 900, (h, w)).astype(np.uint16)
    depth[rng.random((h, w)) < 0.2] = 0
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    coords, idx, _, _ = P.lift(depth, np.array(k), 0, 0.1, 6.0)
    ref = idx[brute_force(coords.T.astype(np.float64), 0.03)]  # first pixel per voxel
    for method in ("sort", "unique"):
        fp = P.lift_frame(rgb, depth, np.array(k), 0, 0.03, 0.1, 6.0, method=method)
        assert (fp.pixel[:, 0] * w + fp.pixel[:, 1]).tolist() == ref.tolist()
        np.testing.assert_array_equal(fp.colors, rgb[fp.pixel[:, 0], fp.pixel[:, 1]])
        np.testing.assert_allclose(fp.coords, relift(depth, fp.pixel, k, 0), atol=1e-5)
        assert fp.voxel_merged == len(idx) - len(ref)


# -- the stage end to end --------------------------------------------------------------------
H, W = 32, 40
K = np.array([40.0, 40.0, 19.5, 15.5], np.float32)


def tiny_frames():
    """{scene: [(rgb, depth, intrinsics, projection)]}: two scenes, one panorama, one empty frame."""
    rng = np.random.default_rng(0)
    out = {}
    for s, n in (("scene_b", 2), ("scene_a", 3)):
        frames = []
        for i in range(n):
            depth = rng.integers(800, 4000, (H, W)).astype(np.uint16)
            depth[rng.random((H, W)) < 0.1] = 0
            proj, intr = 0, K
            if s == "scene_b" and i == 0:
                t, _ = cast(pano_dirs(H, W).reshape(-1, 3))
                depth, proj, intr = to_mm(t).reshape(H, W), 1, np.full(4, np.nan, np.float32)
            if s == "scene_a" and i == 1:
                depth[:] = 0  # no surviving point
            frames.append((rng.integers(0, 256, (H, W, 3), dtype=np.uint8), depth, intr, proj))
        out[s] = frames
    return out


def make_cfg(tmp_path):
    cfg = C.defaults()
    cfg["workdir"] = str(tmp_path / "work")
    cfg["datasets"] = [{"name": "tiny", "kind": "synthetic", "root": None, "frame_skip": 1, "split": "all"}]
    cfg["cluster"]["n_workers"] = 0
    cfg["points"]["voxel_size"] = 0.1
    return cfg


def write_frames(cfg):
    wd = C.workdir(cfg)
    g = groups(cfg, "frames")[0]
    writer = GroupWriter(wd, "frames", g.path, g.config)
    writer.prepare_parts()
    data = tiny_frames()
    for scene, frames in data.items():
        pw = PartWriter(writer.part_path(scene))
        for j, (rgb, depth, intr, proj) in enumerate(frames):
            pw.append(
                rgb=rgb[None],
                depth=depth[None],
                intrinsics=np.asarray(intr, np.float32)[None],
                pose=np.eye(4, dtype=np.float32)[None],
                projection=np.array([proj], np.uint8),
                scene_index=np.zeros(1, np.int32),
                source_index=np.array([j * 10], np.int32),
            )
        pw.finish(frame_templates(H, W), scene=scene)
    writer.commit(sorted(data), attrs={"stored_size": [H, W], "kind": "synthetic"})
    # frames-store order: scenes sorted
    return [f for s in sorted(data) for f in data[s]]


def read_all(cfg):
    g = zarr.open_group(str(C.workdir(cfg) / "points.zarr" / "tiny"), mode="r")
    return {k: g[k][...] for k in ("coords", "colors", "pixel", "offsets")}


def test_stage_end_to_end_rerun_and_resume(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    frames = write_frames(cfg)
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
    cfg = make_cfg(tmp_path)
    with pytest.raises(StoreError, match="lift3d run frames"):
        P.run(cfg)
