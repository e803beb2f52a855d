"""SUN RGB-D reader on image folders written in the dataset's own layout and encodings
(tests/fixtures/sunrgbd_files.py).

Depth PNGs are written bit-rotated (the inverse of the toolbox's read: rotate left by 3),
intrinsics 1-based, extrinsics as the gravity tilt R (3x4, zero translation).
"""

import math

import cv2
import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, ReaderError, Skip
from lift3d.pipeline.readers.sunrgbd import Reader, decode_depth
from tests.fixtures.sunrgbd_files import encode_depth, write_folder


def reader(root, **entry):
    return Reader({"name": "sun", "kind": "sunrgbd", "root": str(root), "split": "all", **entry}, root)


def only(it):
    items = list(it)
    assert len(items) == 1
    return items[0]


def test_bit_rotation_on_hand_computed_values():
    raw = np.array([[0, 8, 24680, 12345, 1, 64000, 8000 << 3, 7999 << 3]], np.uint16)
    # 8 -> 1; 24680 = 3085 * 8 -> 3085; 12345 = 1543 * 8 + 1 -> 1543 | 1 << 13 = 9735 -> clamped 8000;
    # 1 -> 1 << 13 = 8192 -> 8000; 64000 -> 8000; 8000 << 3 -> 8000 exactly; 7999 << 3 -> 7999
    np.testing.assert_array_equal(decode_depth(raw), [[0, 1, 3085, 8000, 8000, 8000, 8000, 7999]])
    mm = np.array([[0, 1, 999, 4321, 7999]])
    np.testing.assert_array_equal(decode_depth(encode_depth(mm)), mm)


def test_decodes_depth_colour_and_1_based_intrinsics(tmp_path):
    depth = (500 + np.arange(48 * 64).reshape(48, 64)).astype(np.uint16)
    rgb = write_folder(tmp_path / "kv1" / "NYUdata" / "NYU0001", depth)
    r = reader(tmp_path, image_size=[48, 64])
    assert r.scenes() == ["kv1/NYUdata/NYU0001"]
    f = only(r.frames("kv1/NYUdata/NYU0001", 7))  # one frame per folder: source_index 0 is always kept
    assert isinstance(f, Frame) and f.source_index == 0 and f.projection == 0
    np.testing.assert_array_equal(f.depth, depth)  # millimetres, exact
    assert np.abs(f.rgb.astype(int) - rgb.astype(int)).mean() < 3  # JPEG, RGB order
    np.testing.assert_allclose(f.intrinsics, [50, 52, 32, 24])  # cx, cy - 1 (1-based K)
    # half size: f / 2, c' = (c + 0.5) / 2 - 0.5 -> (32.5 / 2 - 0.5, 24.5 / 2 - 0.5)
    g = only(reader(tmp_path, image_size=[24, 32]).frames("kv1/NYUdata/NYU0001", 1))
    np.testing.assert_allclose(g.intrinsics, [25, 26, 15.75, 11.75])
    assert g.depth.shape == (24, 32) and g.rgb.shape == (24, 32, 3)
    assert set(np.unique(g.depth)) <= set(np.unique(depth))  # nearest, never interpolated


def test_sensors_of_other_sizes_are_brought_to_the_stored_size(tmp_path):
    write_folder(tmp_path / "a", np.full((48, 64), 1500, np.uint16))
    write_folder(tmp_path / "b", np.full((53, 73), 2500, np.uint16), k=(60.0, 61.0, 37.0, 27.0))
    r = reader(tmp_path, image_size=[48, 64])
    assert r.stored_size() == (48, 64) and r.scenes() == ["a", "b"]
    f = only(r.frames("b", 1))
    assert f.rgb.shape == (48, 64, 3) and (f.depth == 2500).all()
    sx, sy = 64 / 73, 48 / 53
    np.testing.assert_allclose(f.intrinsics, [60 * sx, 61 * sy, 36.5 * sx - 0.5, 26.5 * sy - 0.5], rtol=1e-6)
    assert reader(tmp_path).stored_size() == (480, 640)  # the default


def pitched_scene(theta, height, wall, k0, hw):
    """Depth (mm) seen by a camera pitched down by theta at ``height`` above a floor, with a wall
    ``wall`` metres ahead (horizontally); k0 = 0-based (fx, fy, cx, cy). Returns depth, R, is_floor."""
    h, w = hw
    fx, fy, cx, cy = k0
    r, c = np.mgrid[0:h, 0:w].astype(float)
    ray = np.stack([(c - cx) / fx, (r - cy) / fy, np.ones_like(c)], -1)  # z = 1: t along it is depth z
    # camera -> gravity-aligned frame (x right, y DOWN, z forward horizontal): columns are the camera axes
    rot = np.array([[1, 0, 0], [0, math.cos(theta), math.sin(theta)], [0, -math.sin(theta), math.cos(theta)]])
    g = ray @ rot.T
    with np.errstate(divide="ignore"):
        t_floor = np.where(g[..., 1] > 0, height / g[..., 1], np.inf)
        t_wall = np.where(g[..., 2] > 0, wall / g[..., 2], np.inf)
    t = np.minimum(t_floor, t_wall)
    return np.rint(t * 1000).astype(np.uint16), rot, t_floor < t_wall


def test_gravity_rotation_puts_the_floor_level_and_lowest(tmp_path):
    k0 = (40.0, 40.0, 31.5, 23.5)
    depth, tilt, floor = pitched_scene(math.radians(30), 1.2, 3.0, k0, (48, 64))
    assert 300 < floor.sum() < 48 * 64 - 300
    write_folder(tmp_path / "tilted", depth, k=(k0[0], k0[1], k0[2] + 1, k0[3] + 1), tilt=tilt)
    f = only(reader(tmp_path, image_size=[48, 64]).frames("tilted", 1))
    np.testing.assert_allclose(f.pose[:3, 3], 0)  # rotation only
    np.testing.assert_allclose(f.pose[:3, :3], np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]) @ tilt, atol=1e-6)
    fx, fy, cx, cy = f.intrinsics.astype(float)
    r, c = np.mgrid[0:48, 0:64]
    z = f.depth / 1000.0
    cam = np.stack([(c - cx) / fx * z, (r - cy) / fy * z, z], -1)
    world = cam @ f.pose[:3, :3].astype(float).T
    # floor points: one level plane, 1.2 m below the camera, and the lowest points of all
    assert np.abs(world[..., 2][floor] + 1.2).max() < 0.01
    assert world[..., 2][~floor].min() > -1.2 - 0.01 and world[..., 2][~floor].mean() > -0.9
    # the wall is vertical: its points sit at one horizontal distance (world y, forward)
    assert np.abs(world[..., 1][~floor] - 3.0).max() < 0.01
    # the transposed tilt (a wrong convention) would leave the floor sloping
    wrong = cam @ (np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]) @ tilt.T).T
    assert np.ptp(wrong[..., 2][floor]) > 0.5


def test_depth_folder_choice(tmp_path):
    write_folder(tmp_path / "s", np.full((8, 12), 1000, np.uint16), bfx_mm=np.full((8, 12), 2000, np.uint16))
    assert (only(reader(tmp_path, image_size=[8, 12]).frames("s", 1)).depth == 2000).all()  # auto: depth_bfx
    assert (only(reader(tmp_path, image_size=[8, 12], depth_folder="depth").frames("s", 1)).depth == 1000).all()
    write_folder(tmp_path / "t", np.full((8, 12), 1000, np.uint16))
    assert (only(reader(tmp_path, image_size=[8, 12]).frames("t", 1)).depth == 1000).all()  # auto: no bfx
    with pytest.raises(ReaderError, match=r"t/depth_bfx: depth_bfx depth folder missing"):
        list(reader(tmp_path, depth_folder="depth_bfx").frames("t", 1))
    with pytest.raises(ReaderError, match="depth_folder must be"):
        reader(tmp_path, depth_folder="bfx")


def test_frame_faults_are_skipped(tmp_path):
    write_folder(tmp_path / "empty", np.zeros((8, 12), np.uint16))
    write_folder(tmp_path / "badjpg", np.full((8, 12), 900, np.uint16))
    (tmp_path / "badjpg" / "image" / "badjpg.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    write_folder(tmp_path / "nanpose", np.full((8, 12), 900, np.uint16), tilt=np.full((3, 3), np.nan))
    r = reader(tmp_path, image_size=[8, 12])
    assert [(s, only(r.frames(s, 1)).reason) for s in r.scenes()] == [
        ("badjpg", "corrupt_frame"),
        ("empty", "empty_depth"),
        ("nanpose", "nonfinite_pose"),
    ]
    assert all(isinstance(only(r.frames(s, 1)), Skip) for s in r.scenes())


def test_bad_input_names_the_file(tmp_path):
    write_folder(tmp_path / "nok", np.full((8, 12), 900, np.uint16), intrinsics=False)
    with pytest.raises(ReaderError, match=r"nok/intrinsics\.txt: cannot read intrinsics"):
        list(reader(tmp_path).frames("nok", 1))
    write_folder(tmp_path / "size", np.full((8, 12), 900, np.uint16))
    cv2.imwrite(str(tmp_path / "size" / "depth" / "size.png"), encode_depth(np.full((9, 12), 900)))
    with pytest.raises(ReaderError, match=r"size/depth/size\.png: depth is 12x9 but size\.jpg is 12x8"):
        list(reader(tmp_path).frames("size", 1))
    write_folder(tmp_path / "k2", np.full((8, 12), 900, np.uint16))
    (tmp_path / "k2" / "intrinsics.txt").write_text("50 0 6\n0 50 4\n")
    with pytest.raises(ReaderError, match=r"k2/intrinsics\.txt: intrinsics has shape \(2, 3\)"):
        list(reader(tmp_path).frames("k2", 1))
    with pytest.raises(ReaderError, match="not a folder"):
        reader(tmp_path / "nowhere").scenes()


def test_split_files(tmp_path):
    for name in ("kv1/b/NYU0002", "kv1/b/NYU0001", "xtion/c/0003"):
        write_folder(tmp_path / name, np.full((8, 12), 900, np.uint16))
    r = reader(tmp_path, split="train")
    with pytest.raises(ReaderError, match=r"sunrgbd_train\.txt not found"):
        r.scenes()
    # the official lists hold absolute paths: everything up to the last SUNRGBD/ is cut
    (tmp_path / "my_train.txt").write_text("/n/fs/sun3d/data/SUNRGBD/kv1/b/NYU0002/\n# comment\nxtion/c/0003\n")
    assert reader(tmp_path, split="train", split_train_file="my_train.txt").scenes() == [
        "kv1/b/NYU0002",
        "xtion/c/0003",
    ]
    (tmp_path / "sunrgbd_val.txt").write_text("kv1/b/NYU0001\nkv1/b/NYU9999\n")
    with pytest.raises(ReaderError, match=r"sunrgbd_val\.txt: 1 of the 2 folders.*NYU9999"):
        reader(tmp_path, split="val").scenes()
    assert reader(tmp_path).scenes() == ["kv1/b/NYU0001", "kv1/b/NYU0002", "xtion/c/0003"]
