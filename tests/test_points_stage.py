"""Back-projection geometry against independent computations, and the points stage end to end."""

import numpy as np
import pytest
import zarr

from lift3d.core import config as C
from lift3d.pipeline import frames as F
from lift3d.pipeline import points as P


def test_plane_at_known_depth_and_pose():
    h, w = 24, 32
    fx, fy, cx, cy = 50.0, 40.0, 15.5, 11.5
    depth = np.full((h, w), 2000, np.uint16)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = np.arange(w)[None, :]
    fp = P.lift_frame(rgb, depth, [fx, fy, cx, cy], 0, voxel_size=1e-4, min_depth=0.1, max_depth=6.0)
    assert len(fp.coords) == h * w  # nothing merged at 0.1 mm voxels
    r, c = fp.pixel[:, 0].astype(float), fp.pixel[:, 1].astype(float)
    np.testing.assert_allclose(fp.coords[:, 2], 2.0, atol=1e-6)
    np.testing.assert_allclose(fp.coords[:, 0], (c - cx) / fx * 2.0, atol=1e-5)
    np.testing.assert_allclose(fp.coords[:, 1], (r - cy) / fy * 2.0, atol=1e-5)
    assert (fp.colors[:, 0] == fp.pixel[:, 1]).all()  # colour travels with its pixel
    # a camera 2 m above the floor looking straight down (camera z -> world -z): the plane is the floor
    pose = np.array([[1, 0, 0, 0.5], [0, -1, 0, 0.3], [0, 0, -1, 2.0], [0, 0, 0, 1]], np.float64)
    world = fp.coords @ pose[:3, :3].T + pose[:3, 3]
    np.testing.assert_allclose(world[:, 2], 0.0, atol=1e-5)


def test_depth_range_counts():
    depth = np.array([[0, 50, 100], [3000, 6000, 6001]], np.uint16)
    fp = P.lift_frame(np.zeros((2, 3, 3), np.uint8), depth, [1, 1, 1, 0.5], 0, 1e-4, 0.1, 6.0)
    assert fp.no_depth == 1 and fp.out_of_range == 2  # 50 mm < 0.1 m; 6001 mm > 6 m; both ends kept
    assert sorted(map(tuple, fp.pixel.tolist())) == [(0, 2), (1, 0), (1, 1)]


def test_voxel_downsample_matches_brute_force():
    rng = np.random.default_rng(1)
    pts = rng.uniform(-1, 1, (4000, 3)).astype(np.float32)
    keep = P.voxel_downsample(pts, 0.2)
    first = {}
    for i, p in enumerate(pts.astype(np.float64)):
        first.setdefault(tuple(np.floor(p / 0.2).astype(int)), i)
    assert sorted(keep.tolist()) == sorted(first.values())
    assert P.voxel_downsample(pts, 0.2, method="unique").tolist() == keep.tolist()


# -- panorama vs pinhole on an asymmetric scene -----------------------------------------------
SPHERES = [
    (np.array([-1.2, 0.0, 2.5]), 0.5),  # to the left (OpenCV -x) and ahead
    (np.array([0.3, -1.2, 2.5]), 0.4),  # above (OpenCV -y)
    (np.zeros(3), 8.0),
]  # the room around the camera (hit from inside)


def hit_distance(dirs):
    """Distance along unit rays from the origin to the nearest sphere surface."""
    best = np.full(len(dirs), np.inf)
    for c, r in SPHERES:
        b = dirs @ c
        disc = b**2 - (c @ c - r * r)
        ok = disc >= 0
        sq = np.sqrt(np.where(ok, disc, 0))
        t0, t1 = b - sq, b + sq
        t = np.where(t0 > 1e-9, t0, t1)
        t = np.where(ok & (t > 1e-9), t, np.inf)
        best = np.minimum(best, t)
    return best


def on_surface(points, tol=0.01):
    return np.min([np.abs(np.linalg.norm(points - c, axis=1) - r) for c, r in SPHERES], axis=0) < tol


def which_sphere(points, tol=0.01):
    return np.argmin([np.abs(np.linalg.norm(points - c, axis=1) - r) for c, r in SPHERES], axis=0)


def test_panorama_and_pinhole_lift_the_same_asymmetric_scene():
    # the panorama rendered with the design's mapping, written out here from the design card
    H, W = 90, 180
    u = np.pi - 2 * np.pi * (np.arange(W) + 0.5) / W
    v = np.pi * (np.arange(H) + 0.5) / H - np.pi / 2
    uu, vv = np.meshgrid(u, v)
    seed = np.stack([np.cos(vv) * np.cos(uu), np.cos(vv) * np.sin(uu), -np.sin(vv)], -1).reshape(-1, 3)
    cam = np.stack([-seed[:, 1], -seed[:, 2], seed[:, 0]], 1)
    pano_depth = np.rint(hit_distance(cam) * 1000).reshape(H, W).astype(np.uint16)
    # the pinhole view of the same scene, its rays from K^-1 [col, row, 1]
    h, w, f = 60, 80, 40.0
    rows, cols = np.mgrid[0:h, 0:w]
    d = np.stack([(cols - 39.5) / f, (rows - 29.5) / f, np.ones((h, w))], -1).reshape(-1, 3)
    dist = hit_distance(d / np.linalg.norm(d, axis=1, keepdims=True))
    pin_depth = np.rint(dist * d[:, 2] / np.linalg.norm(d, axis=1) * 1000).reshape(h, w).astype(np.uint16)

    pano = P.lift_frame(np.zeros((H, W, 3), np.uint8), pano_depth, [np.nan] * 4, 1, 1e-4, 0.1, 10.0)
    pin = P.lift_frame(np.zeros((h, w, 3), np.uint8), pin_depth, [f, f, 39.5, 29.5], 0, 1e-4, 0.1, 10.0)
    for fp in (pano, pin):
        assert on_surface(fp.coords.astype(np.float64), tol=0.02).mean() > 0.999
    # both views see the left sphere and the one above, at the same places (a mirrored mapping lands
    # the left sphere's pixels on the right, off every surface)
    for k in (0, 1):
        a = pano.coords[which_sphere(pano.coords.astype(np.float64)) == k]
        b = pin.coords[which_sphere(pin.coords.astype(np.float64)) == k]
        assert len(a) > 10 and len(b) > 10
        c, r = SPHERES[k]
        nearest = (np.linalg.norm(c) - r) * c / np.linalg.norm(c)  # the sphere's point nearest the camera
        for pts in (a, b):
            closest = pts[np.argmin(np.linalg.norm(pts, axis=1))]
            np.testing.assert_allclose(closest, nearest, atol=0.08)
    left = pano.coords[which_sphere(pano.coords.astype(np.float64)) == 0]
    assert (left[:, 0] < 0).all()
    # the pixel of each pano point sits left of the centre column (u > 0 is to the left)
    cols_left = pano.pixel[which_sphere(pano.coords.astype(np.float64)) == 0][:, 1]
    assert (cols_left < W / 2).all()


# -- the stage ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pts")
    cfg = C.load(
        None,
        [
            f"workdir={wd}",
            "datasets.0.scenes=2",
            "datasets.0.frames_per_scene=12",
            "datasets.0.depth_size=[48, 64]",
            "datasets.0.split=all",
            "cluster.n_workers=0",
            "points.voxel_size=0.05",
        ],
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
    cfg2 = C.load(None, [f"workdir={tmp_path}", "cluster.n_workers=0"])
    with pytest.raises(Exception, match="lift3d run frames"):
        P.run(cfg2)
