"""Matterport3D undistorted frames: a house written in the release's layout (.conf text, uint16
depth PNG in 0.25 mm, JPEG colour; tests/fixtures/matterport_files.py) and read back."""

import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, ReaderError, Skip
from lift3d.pipeline.readers.matterport import Reader
from tests.fixtures.matterport_files import HOUSE, K1, K2, POSE_CV, POSE_GL, H, W, opencv, write_house


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
