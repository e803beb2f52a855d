"""Matterport3D undistorted frames: a house written here in the release's layout (.conf text,
uint16 depth PNG in 0.25 mm, JPEG colour) and read back."""

import cv2
import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, ReaderError, Skip
from lift3d.pipeline.readers.matterport import Reader

H, W = 16, 20
HOUSE = "17DRP5sb8fy"
K1 = (25.0, 26.0, 9.5, 5.0)  # as written in the .conf: cy counted from the bottom row
K2 = (40.0, 40.0, 10.0, 8.0)


def opencv(k):
    """The same intrinsics with rows counted from the top: cy -> H - 1 - cy."""
    return (k[0], k[1], k[2], H - 1 - k[3])


# camera at (1, 2, 3) looking along world +x with world z up, in OpenGL axes (x right, y up, z back)
POSE_GL = np.array([[0, 0, -1, 1], [-1, 0, 0, 2], [0, 1, 0, 3], [0, 0, 0, 1.0]])
# the same camera in OpenCV axes (x right, y down, z forward), worked by hand
POSE_CV = np.array([[0, 0, 1, 1], [-1, 0, 0, 2], [0, -1, 0, 3], [0, 0, 0, 1.0]])


def kline(fx, fy, cx, cy):
    return f"intrinsics_matrix {fx} 0 {cx} 0 {fy} {cy} 0 0 1"


def raw_depth(i):
    return (4000 + 4 * i + np.arange(H * W).reshape(H, W)).astype(np.uint16)  # 0.25 mm units


def write_house(root, bad=None, intrinsics_first=True, house=HOUSE):
    bad = bad or {}
    d = root / house
    for sub in ("undistorted_color_images", "undistorted_depth_images", "undistorted_camera_parameters"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "dataset matterport",
        "n_images 4",
        "depth_directory undistorted_depth_images",
        "color_directory undistorted_color_images",
    ]
    if intrinsics_first:
        lines.append(kline(*K1))
    for i in range(4):
        if i == 2:
            lines.append(kline(*K2))
        pose = POSE_GL.copy()
        pose[2, 3] += i
        if bad.get(i) == "pose":
            pose[0, 0] = np.nan
        dn, cn = f"pano{i}_d1_{i}.png", f"pano{i}_i1_{i}.jpg"
        lines.append(f"scan {dn} {cn} " + " ".join(f"{v:g}" for v in pose.ravel()))
        img = np.full((H, W, 3), (30 + 40 * i, 120, 200), np.uint8)  # RGB
        jpg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
        (d / "undistorted_color_images" / cn).write_bytes(b"junk" if bad.get(i) == "jpeg" else jpg)
        dep = raw_depth(i) if bad.get(i) != "size" else np.ones((H, W + 4), np.uint16)
        cv2.imwrite(str(d / "undistorted_depth_images" / dn), dep)
    (d / "undistorted_camera_parameters" / f"{house}.conf").write_text("\n".join(lines) + "\n")
    return d


def reader(root, **kw):
    return Reader({"name": "m", "kind": "matterport", "root": str(root), "split": "all", **kw}, root)


def test_depth_units_intrinsics_blocks_and_pose_convention(tmp_path):
    write_house(tmp_path)
    r = reader(tmp_path)
    assert r.scenes() == [HOUSE] and r.stored_size() == (H, W)
    got = list(r.frames(HOUSE, 1))
    assert [g.source_index for g in got] == [0, 1, 2, 3] and all(isinstance(g, Frame) for g in got)
    for f in got:
        # mm = d / 4 rounded: d = 4000 + 4 i + n -> 1000 + i + round(n / 4) (halves round up)
        n = np.arange(H * W).reshape(H, W)
        np.testing.assert_array_equal(f.depth, 1000 + f.source_index + (n + 2) // 4)
        np.testing.assert_allclose(f.intrinsics, opencv(K1 if f.source_index < 2 else K2))  # block applies onwards
        expect = POSE_CV.copy()
        expect[2, 3] += f.source_index
        np.testing.assert_allclose(f.pose, expect, atol=1e-6)
        assert np.abs(f.rgb.astype(int) - [30 + 40 * f.source_index, 120, 200]).max() <= 3
    # a world point 1 m ahead of the camera (along world +x) is at camera z = +1, centred
    p_cam = np.linalg.inv(got[0].pose.astype(float)) @ np.array([2.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(p_cam[:3], [0, 0, 1], atol=1e-6)


def test_frame_skip_and_skips(tmp_path):
    write_house(tmp_path, bad={0: "pose", 2: "jpeg"})
    got = [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in reader(tmp_path).frames(HOUSE, 2)]
    assert got == [(0, "nonfinite_pose"), (2, "corrupt_frame")]
    got = [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in reader(tmp_path).frames(HOUSE, 3)]
    assert got == [(0, "nonfinite_pose"), (3, "ok")]


def test_image_size_and_errors(tmp_path):
    write_house(tmp_path)
    f = next(iter(reader(tmp_path, image_size=[8, 10]).frames(HOUSE, 1)))
    np.testing.assert_allclose(f.intrinsics, [12.5, 13, 4.5, 4.75])  # (c + 0.5) / 2 - 0.5, cy = 15 - 5 = 10
    write_house(tmp_path, bad={1: "size"})
    with pytest.raises(ReaderError, match=r"pano1_d1_1\.png: depth is 24x16 but colour"):
        list(reader(tmp_path).frames(HOUSE, 1))
    write_house(tmp_path, intrinsics_first=False)
    with pytest.raises(ReaderError, match=rf"{HOUSE}\.conf:5: scan line before any intrinsics_matrix"):
        list(reader(tmp_path).frames(HOUSE, 1))
    (tmp_path / HOUSE / "undistorted_camera_parameters" / f"{HOUSE}.conf").unlink()
    with pytest.raises(ReaderError, match=rf"{HOUSE}\.conf: cannot read camera parameters"):
        list(reader(tmp_path, image_size=[H, W]).frames(HOUSE, 1))
    with pytest.raises(ReaderError, match="no houses"):
        reader(tmp_path).scenes()


def test_splits(tmp_path):
    write_house(tmp_path)
    write_house(tmp_path, house="zsNo4HB9uLZ")
    (tmp_path / "scenes_val.txt").write_text("zsNo4HB9uLZ\n")
    assert reader(tmp_path, split="val").scenes() == ["zsNo4HB9uLZ"]
    with pytest.raises(ReaderError, match=r"scenes_train\.txt not found"):
        reader(tmp_path, split="train").scenes()


def test_bottom_origin_cy_projects_like_matterports_convention(tmp_path):
    """A point in front of the camera lands on the same stored row whether it is projected the
    way Matterport documents its .conf (OpenGL camera, y up, rows counted from the bottom with
    the .conf's cy) or with the stored OpenCV intrinsics and pose (rows from the top)."""
    write_house(tmp_path)
    f = next(iter(reader(tmp_path).frames(HOUSE, 1)))
    fx, fy, cx, cy = K1
    p_world = np.array([2.0, 1.7, 3.4, 1.0])  # 1 m ahead, a bit right and up
    x, y, z = (np.linalg.inv(POSE_GL) @ p_world)[:3]  # OpenGL camera: looks along -z, y up
    row_from_bottom = cy + fy * y / -z
    col = cx + fx * x / -z
    X, Y, Z = (np.linalg.inv(f.pose.astype(float)) @ p_world)[:3]
    fx2, fy2, cx2, cy2 = f.intrinsics
    np.testing.assert_allclose([cx2 + fx2 * X / Z, cy2 + fy2 * Y / Z], [col, H - 1 - row_from_bottom], atol=1e-5)


def test_cy_origin_top_keeps_cy_and_bad_values_are_refused(tmp_path):
    write_house(tmp_path)
    got = [g.intrinsics for g in reader(tmp_path, cy_origin="top").frames(HOUSE, 1)]
    np.testing.assert_allclose(got[0], K1)
    np.testing.assert_allclose(got[3], K2)
    with pytest.raises(ReaderError, match="cy_origin must be 'bottom'"):
        reader(tmp_path, cy_origin="up")
