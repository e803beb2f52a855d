"""Back-projection geometry against independent computations: pinhole and panorama lifting
by hand, against an independent ray caster (boxes in a room, tests/fixtures/geometry.py) and
against spheres, the depth range, and voxel down-sampling against a brute-force reference."""

import math

import numpy as np
import pytest

from lift3d.pipeline import points as P
from tests.fixtures.geometry import cast, pano_dirs, pinhole_dirs, relift, to_mm


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


# -- plane, range and voxels, again by hand ------------------------------------------------
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


def test_voxel_downsample_default_method_matches_brute_force_and_unique():
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
