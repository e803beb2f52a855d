"""Equirectangular RGB-D panoramas (<name>_rgb.png + <name>_depth.exr|png), written with cv2 (EXR
through OpenCV's OpenEXR codec; tests/fixtures/matterport_pano_files.py) and read back."""

import os

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lift3d.pipeline.readers.base import EQUIRECT, Frame, ReaderError, Skip  # noqa: E402
from lift3d.pipeline.readers.matterport_pano import Reader  # noqa: E402
from tests.fixtures.matterport_pano_files import HOUSE, H, W, metres, write_pano


def reader(root, **kw):
    return Reader({"name": "p", "kind": "matterport_pano", "root": str(root), "split": "all", **kw}, root)


def test_exr_and_png_depth_pose_and_projection(tmp_path):
    d = tmp_path / HOUSE
    pose = np.eye(4)
    pose[:3, 3] = [1, 2, 3]
    img0 = write_pano(d, "a", 0, "exr")
    write_pano(d, "b", 1, "png", pose=pose)
    write_pano(d, "c", 2, "png", scale=1000)
    r = reader(tmp_path)
    assert r.scenes() == [HOUSE] and r.stored_size() == (H, W)
    got = list(r.frames(HOUSE, 1))
    assert [g.source_index for g in got] == [0, 1, 2] and all(isinstance(g, Frame) for g in got)
    np.testing.assert_array_equal(got[0].depth, np.rint(metres(0) * 1000).astype(np.uint16))  # EXR metres -> mm
    np.testing.assert_array_equal(got[1].depth, np.rint(metres(1) * 1000).astype(np.uint16))  # 1/4000 m -> mm
    np.testing.assert_array_equal(got[0].rgb, img0)  # PNG colour, RGB order, exact
    np.testing.assert_allclose(got[1].pose, pose)
    np.testing.assert_allclose(got[0].pose, np.eye(4))
    for f in got:
        assert f.projection == EQUIRECT and np.isnan(f.intrinsics).all() and f.intrinsics.shape == (4,)
    # the third was written in mm with scale 1000 but read with the default 4000: a quarter
    np.testing.assert_array_equal(got[2].depth, np.rint(np.rint(metres(2) * 1000) / 4).astype(np.uint16))
    got_mm = list(reader(tmp_path, depth_scale=1000).frames(HOUSE, 1))[2]
    np.testing.assert_array_equal(got_mm.depth, np.rint(metres(2) * 1000).astype(np.uint16))


def test_frame_skip_skips_and_resize(tmp_path):
    d = tmp_path / HOUSE
    write_pano(d, "a", 0, "exr")
    write_pano(d, "b", 1, "empty")
    write_pano(d, "c", 2, "png", rgb_bytes=b"\x89PNG broken")
    write_pano(d, "d", 3, "png", pose=np.full((4, 4), -np.inf))
    got = [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in reader(tmp_path).frames(HOUSE, 1)]
    assert got == [(0, "ok"), (1, "empty_depth"), (2, "corrupt_frame"), (3, "nonfinite_pose")]
    assert [g.source_index for g in reader(tmp_path).frames(HOUSE, 2)] == [0, 2]
    f = next(iter(reader(tmp_path, image_size=[4, 8]).frames(HOUSE, 1)))
    np.testing.assert_array_equal(f.depth, np.rint(metres(0) * 1000).astype(np.uint16)[1::2, 1::2])
    assert f.rgb.shape == (4, 8, 3)


def test_wrong_aspect_ratio_and_missing_depth_name_the_file(tmp_path):
    d = tmp_path / HOUSE
    write_pano(d, "a", 0, "png", hw=(8, 12))
    with pytest.raises(ReaderError, match=r"a_rgb\.png: panorama is 12x8.*W = 2H"):
        list(reader(tmp_path, image_size=[8, 16]).frames(HOUSE, 1))
    with pytest.raises(ReaderError, match="must have W = 2H"):
        reader(tmp_path).stored_size()
    (d / "a_depth.png").unlink()
    with pytest.raises(ReaderError, match=r"a_rgb\.png: no matching a_depth\.exr or a_depth\.png"):
        list(reader(tmp_path, image_size=[8, 16]).frames(HOUSE, 1))
